"""What the driver checks of a job's model and SAEs before anything starts.

A model path that does not exist, an SAE name that is not shipped, an SAE
folder that is not one, or an SAE whose hook the model lacks or whose width
does not fit: each is found here, from files alone (the model's config and
each SAE's ``cfg.json``, no weights), before the lease, the store or Ray.
A worker would find the same mistakes only after its cluster started, and
an actor dying in its constructor would report them as Ray's
``ActorDiedError``. What needs the loaded model or a download (official
model names, ``pretrained:`` SAEs, a default model not yet converted) is
left to the worker, whose start-up errors reach the user with their own
message (:mod:`circuitscan.services.jobs.worker`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.models import DEFAULT_MODEL, ModelSpec, SAESpec

log = logging.getLogger(__name__)


def model_directory(spec: ModelSpec) -> Path | None:
    """The local Hugging Face folder the model loads from, None when only a worker can tell.

    Raises the loader's own :class:`ModelLoadError` for a path that does not
    exist or is not a model, the same message a worker would give.
    """
    from circuitscan.services.model_loading import (
        ModelLoadError,
        _is_converted,
        default_gguf_path,
        gguf_cache_dir,
    )

    source = spec.source
    if source == DEFAULT_MODEL or source.endswith(".gguf"):
        gguf = default_gguf_path() if source == DEFAULT_MODEL else Path(source).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        converted = gguf_cache_dir(gguf)
        return converted if _is_converted(converted) else None
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model path {source} is not a Hugging Face model directory (no config.json) "
                "nor a .gguf file"
            )
        return path.resolve()
    if source.startswith(("/", "./", "../", "~")) or "\\" in source:
        raise ModelLoadError(f"model path not found: {source}")
    return None  # an official name: the worker resolves it (local cache only)


@functools.lru_cache(maxsize=4)
def model_config(directory: Path) -> Any:
    """TransformerLens's config of the model in ``directory`` (read from its config.json),
    None when it cannot be built here (the worker then reports why)."""
    try:
        import torch
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config

        from circuitscan.services.model_loading import _neutral_path

        return get_pretrained_model_config(
            str(_neutral_path(directory)), dtype=torch.float32, device="cpu"
        )
    except Exception as exc:  # an unsupported architecture: the worker's loader says so
        log.debug("no model config for %s on the driver: %s", directory, exc)
        return None


def _sae_config(spec: SAESpec) -> tuple[str, dict[str, Any]] | None:
    """(name, cfg.json) of a local SAE, None for a ``pretrained:`` one (only a worker has it)."""
    from circuitscan.services.sae_loading import (
        DEFAULT_PREFIX,
        PRETRAINED_PREFIX,
        SAELoadError,
        _default_dir,
    )

    source = spec.source
    if source.startswith(PRETRAINED_PREFIX):
        return None
    if source.startswith(DEFAULT_PREFIX):
        directory = _default_dir(source.removeprefix(DEFAULT_PREFIX))
    else:
        directory = Path(source).expanduser()
    if not directory.is_dir():
        raise SAELoadError(f"SAE directory not found: {directory}")
    missing = [f for f in ("cfg.json", "sae_weights.safetensors") if not (directory / f).is_file()]
    if missing:
        raise SAELoadError(f"{directory} is not an SAE saved by sae_lens: missing {missing}")
    try:
        cfg = json.loads((directory / "cfg.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAELoadError(f"{directory / 'cfg.json'} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{directory / 'cfg.json'} is not a JSON object")
    return source, cfg


def _hook_name(cfg: dict[str, Any]) -> str | None:
    metadata = cfg.get("metadata")
    if isinstance(metadata, dict) and metadata.get("hook_name"):
        return str(metadata["hook_name"])
    return str(cfg["hook_name"]) if cfg.get("hook_name") else None


def check_sae_fits(name: str, cfg: dict[str, Any], model_cfg: Any) -> None:
    """The SAE's hook exists in a model of this config and its ``d_in`` is that hook's width."""
    from circuitscan.pipelines.site_width import config_site_width
    from circuitscan.services.sae_loading import SAELoadError

    hook = _hook_name(cfg)
    if hook is None:
        raise SAELoadError(f"SAE {name} has no hook_name in its cfg.json")
    try:
        site = HookSite.from_hook_name(hook)
    except UserInputError as exc:
        raise SAELoadError(f"SAE {name}: {exc}") from exc
    layers = int(model_cfg.n_layers)
    if site.layer >= layers:
        raise SAELoadError(
            f"SAE {name} reads {hook}, but the model has {layers} layers (blocks 0..{layers - 1})"
        )
    try:
        width = config_site_width(model_cfg, site)
    except UserInputError as exc:
        raise SAELoadError(f"SAE {name}: {exc}") from exc
    d_in = cfg.get("d_in")
    if d_in is not None and int(d_in) != width:
        detail = " (n_heads·d_head)" if site.point == "z" else ""
        raise SAELoadError(
            f"SAE {name} has d_in={d_in}, which does not match {hook} width {width}{detail} "
            "of this model"
        )


def check_model_and_saes(spec: JobSpec) -> None:
    """Every mistake in the job's model and SAE sources that files alone show, one line each."""
    directory = model_directory(spec.model)
    configs = [c for c in (_sae_config(sae) for sae in spec.saes) if c is not None]
    if not configs or directory is None:
        return
    model_cfg = model_config(directory)
    if model_cfg is None:
        return
    for name, cfg in configs:
        check_sae_fits(name, cfg, model_cfg)


_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def check_batch_memory(
    spec: JobSpec, n_prompts: int, longest: Callable[[], list[tuple[int, int]]]
) -> None:
    """Refuse a job whose longest prompt, cut to the token cap, cannot fit one batch in memory.

    ``longest`` measures the prompts (of ``n_prompts``) most likely to be
    the longest: (prompt index, tokens with BOS). A batch is padded to its longest prompt, and a
    forward pass keeps each layer's attention pattern (batch × heads × L²
    values) for the backward pass: that alone is a lower bound of what the
    batch holding that prompt needs. Checked on CPU machines against this
    machine's memory (a GPU's memory is only known on its node); a model
    whose config only a worker can read is not checked.
    """
    import psutil

    from circuitscan.services.devices import resolve_device

    if resolve_device(spec.model.device).type != "cpu":
        return
    directory = model_directory(spec.model)
    model_cfg = model_config(directory) if directory is not None else None
    if model_cfg is None:
        return
    n_ctx = int(model_cfg.n_ctx)
    cap = min(n_ctx, spec.max_prompt_tokens) if spec.max_prompt_tokens else n_ctx
    measured = longest()
    if spec.overlong == "reject":  # prompts over the cap are dropped, not run
        measured = [(i, n) for i, n in measured if n <= cap]
    if not measured:
        return
    prompt, tokens = max(measured, key=lambda item: item[1])
    tokens = min(tokens, cap)
    rows = min(spec.execution.batch_size, n_prompts)
    if spec.execution.batch_tokens is not None:  # the widest batch holds this many prompts
        rows = min(rows, max(1, spec.execution.batch_tokens // tokens))
    per_token2 = (
        rows
        * int(model_cfg.n_heads)
        * int(model_cfg.n_layers)
        * _DTYPE_BYTES.get(spec.model.dtype, 4)
    )
    available = psutil.virtual_memory().total
    if per_token2 * tokens**2 <= available:
        return
    from circuitscan.services.jobs.spec_checks import JobError

    fits = max(2, int((available / per_token2) ** 0.5))
    context = "" if spec.max_prompt_tokens else ": the model's context"
    raise JobError(
        f"prompt {prompt} runs to {tokens} tokens (token cap {cap}{context}); a batch of "
        f"{rows} padded to it needs at least "
        f"{per_token2 * tokens**2 / 2**30:.0f} GiB for its attention patterns, more than this "
        f"machine's {available / 2**30:.0f} GiB: set max_prompt_tokens (about {fits} fits) "
        "or a smaller execution.batch_size or execution.batch_tokens"
    )
