"""``circuitscan serve``: settings from the environment and flags, then uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import SecretStr, ValidationError

from circuitscan.schemas.errors import UserInputError
from circuitscan.services.api.app import create_app
from circuitscan.services.api.settings import ENV_PREFIX, ApiSettings, read_tokens_file

log = logging.getLogger(__name__)


def build_settings(
    *,
    store_root: str | Path | None = None,
    ray_address: str | None = None,
    tokens_file: Path | None = None,
    protect_reads: bool | None = None,
    max_body_bytes: int | None = None,
    max_page_size: int | None = None,
) -> ApiSettings:
    """Environment settings with the given flags on top (UserInputError with a readable message)."""
    try:
        base = ApiSettings.from_env(
            store_root=store_root,
            ray_address=ray_address,
            protect_reads=protect_reads,
            max_body_bytes=max_body_bytes,
            max_page_size=max_page_size,
        )
        if tokens_file is not None:
            extra = tuple(read_tokens_file(tokens_file))
            base = ApiSettings.model_validate(
                base.model_dump() | {"tokens": base.tokens + tuple(SecretStr(t) for t in extra)}
            )
        return base
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserInputError(f"invalid API settings: {problems}") from exc
    except OSError as exc:
        raise UserInputError(f"cannot read the tokens file: {exc}") from exc


_FLAG_ENV = {
    "store_root": "STORE_ROOT",
    "ray_address": "RAY_ADDRESS",
    "tokens_file": "TOKENS_FILE",
    "protect_reads": "PROTECT_READS",
    "max_body_bytes": "MAX_BODY_BYTES",
    "max_page_size": "MAX_PAGE_SIZE",
}


def app_from_env():
    """App factory for uvicorn worker processes: settings from CIRCUITSCAN_API_* only."""
    return create_app(build_settings())


def serve_api(*, host: str, port: int, workers: int = 1, **flags: object) -> None:
    """Run the API until interrupted (``workers`` > 1: that many uvicorn processes)."""
    import uvicorn

    settings = build_settings(**flags)  # type: ignore[arg-type]
    if not settings.tokens:
        log.warning("no API tokens configured: every mutating route will answer 403")
    print(
        f"circuitscan API on http://{host}:{port} (stores under {settings.store_root}; "
        f"{workers} worker(s); browser at /web/, OpenAPI at /docs)",
        flush=True,
    )
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, access_log=False)
        return
    # Worker processes rebuild the settings from the environment: put the flags there.
    for name, value in flags.items():
        if value is not None:
            text = ("1" if value else "0") if isinstance(value, bool) else str(value)
            os.environ[ENV_PREFIX + _FLAG_ENV[name]] = text
    uvicorn.run(
        "circuitscan.services.api.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
    )
