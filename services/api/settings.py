"""Configuration of the HTTP API: from ``CIRCUITSCAN_API_*`` environment variables or flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from circuitscan.services.api.store_roots import check_root

ENV_PREFIX = "CIRCUITSCAN_API_"


class ApiSettings(BaseModel):
    """Everything ``create_app`` needs; nothing else is read from the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store_root: str = Field(
        description="Directory, or s3://BUCKET/PREFIX, whose named entries are the stores the "
        "API serves and jobs submitted through it write."
    )
    tokens: tuple[SecretStr, ...] = Field(
        default=(),
        description="Accepted bearer tokens. Without any, every mutating route answers 403.",
    )
    protect_reads: bool = Field(
        default=False, description="Require a bearer token on read routes too."
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray dashboard (job server) address, e.g. http://HEAD:8265; None: jobs off.",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest accepted request body (bytes); else 413."
    )
    max_page_size: int = Field(
        default=200, ge=1, le=100_000, description="Largest page any listing route returns."
    )
    decoded_shards: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Decoded site shards each open store keeps in memory for point queries.",
    )
    store_refresh_seconds: float = Field(
        default=1.0,
        ge=0.0,
        description=(
            "How often an open store in use checks whether a job committed shards (its index "
            "pointer and writer lease versions; the manifest is listed only when they changed)"
        ),
    )

    @field_validator("store_root", mode="before")
    @classmethod
    def _root_text(cls, root: object) -> object:
        return os.fspath(root) if isinstance(root, os.PathLike) else root

    @field_validator("store_root")
    @classmethod
    def _supported_root(cls, root: str) -> str:
        return check_root(root)

    @field_validator("tokens")
    @classmethod
    def _no_blank_tokens(cls, tokens: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(not token.get_secret_value().strip() for token in tokens):
            raise ValueError("API tokens must not be blank")
        return tokens

    def token_values(self) -> list[str]:
        """The accepted tokens in clear (for constant-time comparison only)."""
        return [token.get_secret_value() for token in self.tokens]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> ApiSettings:
        """Settings from ``CIRCUITSCAN_API_*`` variables; explicit ``overrides`` win.

        STORE_ROOT (default ``$CIRCUITSCAN_HOME/stores``), TOKENS (comma-separated),
        TOKENS_FILE (one token a line), PROTECT_READS (1/true/yes), RAY_ADDRESS,
        MAX_BODY_BYTES, MAX_PAGE_SIZE, STORE_REFRESH_SECONDS, DECODED_SHARDS.
        """
        env = dict(os.environ if env is None else env)

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        values: dict[str, object] = {}
        root = get("STORE_ROOT")
        if root is None:
            home = env.get("CIRCUITSCAN_HOME") or str(Path.home() / ".cache" / "circuitscan")
            root = str(Path(home) / "stores")
        values["store_root"] = root
        tokens = [t.strip() for t in (get("TOKENS") or "").split(",") if t.strip()]
        tokens_file = get("TOKENS_FILE")
        if tokens_file:
            tokens += read_tokens_file(Path(tokens_file))
        values["tokens"] = tuple(tokens)
        protect = get("PROTECT_READS")
        if protect is not None:
            values["protect_reads"] = protect.lower() in ("1", "true", "yes")
        for name, key in (
            ("RAY_ADDRESS", "ray_address"),
            ("MAX_BODY_BYTES", "max_body_bytes"),
            ("MAX_PAGE_SIZE", "max_page_size"),
            ("STORE_REFRESH_SECONDS", "store_refresh_seconds"),
            ("DECODED_SHARDS", "decoded_shards"),
        ):
            if get(name) is not None:
                values[key] = get(name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def read_tokens_file(path: Path) -> list[str]:
    """Tokens from a file, one a line; blank lines and ``#`` comments ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
