"""Load sae_lens SAEs for a model, and check they fit it.

Sources (see ``SAESpec``): ``default/<name>`` (shipped in
``services/default_saes/<name>/``), a local directory saved by sae_lens
(cfg.json + sae_weights.safetensors, any architecture sae_lens knows), or
``pretrained:<release>/<sae_id>`` from sae_lens's registry when its files are
already in the local Hugging Face cache (the hub is never contacted).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.fingerprint import fingerprint_tensors
from circuitscan.pipelines.sae_splice import sae_hook_name
from circuitscan.pipelines.site_width import site_width
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.models import SAESpec

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "default/"
PRETRAINED_PREFIX = "pretrained:"


class SAELoadError(UserInputError):
    """An SAE spec that cannot be loaded or does not fit the model; the message says why."""


@dataclass
class LoadedSAE:
    sae: SAE[Any]
    site: HookSite
    fingerprint: str
    name: str
    source_dir: Path | None


def default_sae_root() -> Path:
    return Path(__file__).resolve().parent / "default_saes"


def default_sae_names() -> list[str]:
    """Names of the SAEs shipped for the default model, e.g. ``L15.resid_post``."""
    root = default_sae_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "cfg.json").is_file())


def _default_dir(name: str) -> Path:
    names = default_sae_names()
    if name not in names:
        raise SAELoadError(
            f"no default SAE named {name!r}; available: {', '.join(names) or 'none'}"
        )
    return default_sae_root() / name


def _load_directory(directory: Path, device: str) -> SAE[Any]:
    if not directory.is_dir():
        raise SAELoadError(f"SAE directory not found: {directory}")
    missing = [f for f in ("cfg.json", "sae_weights.safetensors") if not (directory / f).is_file()]
    if missing:
        raise SAELoadError(f"{directory} is not an SAE saved by sae_lens: missing {missing}")
    try:
        return SAE.load_from_disk(directory, device=device)
    except (KeyError, ValueError) as exc:
        raise SAELoadError(f"sae_lens cannot load the SAE in {directory}: {exc}") from exc


def _load_pretrained(reference: str, device: str) -> SAE[Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, sep, sae_id = reference.partition("/")
    if not sep or not release or not sae_id:
        raise SAELoadError(
            f"expected 'pretrained:<release>/<sae_id>', got 'pretrained:{reference}'"
        )
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise SAELoadError(f"unknown sae_lens release {release!r}")
    if sae_id not in directory[release].saes_map:
        some = ", ".join(sorted(directory[release].saes_map)[:8])
        raise SAELoadError(f"release {release!r} has no SAE {sae_id!r} (some ids: {some}, ...)")
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as exc:  # hub/cache errors come in many types; all mean "not local"
        raise SAELoadError(
            f"pretrained SAE {release}/{sae_id} is not in the local Hugging Face cache "
            f"(downloads are off; fetch it first): {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def validate_sae(sae: SAE[Any], model: HookedSAETransformer) -> HookSite:
    """The SAE's hook site, after checking the model has that hook and its width fits."""
    hook = sae_hook_name(sae)
    if hook not in model.hook_dict:
        raise SAELoadError(f"the SAE reads {hook!r}, which this model does not have")
    try:
        site = HookSite.from_hook_name(hook)
    except ValueError as exc:
        raise SAELoadError(f"unsupported SAE hook {hook!r}: {exc}") from exc
    if getattr(sae.cfg.metadata, "hook_head_index", None) is not None:
        raise SAELoadError(f"single-head SAEs (hook_head_index) are not supported: {hook}")
    expected = site_width(model, site)
    if sae.cfg.d_in != expected:
        detail = " (n_heads·d_head)" if site.point == "z" else ""
        raise SAELoadError(
            f"SAE d_in={sae.cfg.d_in} does not match {hook} width {expected}{detail} of this model"
        )
    if site.point == "z" and getattr(sae.cfg, "reshape_activations", "none") != "hook_z":
        # hook_z carries [.., n_heads, d_head]; the SAE must flatten it.
        sae.cfg.reshape_activations = "hook_z"
        sae.turn_on_forward_pass_hook_z_reshaping()
    return site


def load_sae(
    spec: SAESpec | str,
    model: HookedSAETransformer,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedSAE:
    """Load the SAE a spec names, on the model's device and dtype unless told otherwise."""
    spec = SAESpec(source=spec) if isinstance(spec, str) else spec
    device = str(device or model.cfg.device)
    dtype = dtype or model.cfg.dtype
    source = spec.source
    source_dir: Path | None = None
    if source.startswith(DEFAULT_PREFIX):
        name = source.removeprefix(DEFAULT_PREFIX)
        source_dir = _default_dir(name)
        sae = _load_directory(source_dir, device)
    elif source.startswith(PRETRAINED_PREFIX):
        name = source.removeprefix(PRETRAINED_PREFIX)
        sae = _load_pretrained(name, device)
    else:
        source_dir = Path(source).expanduser().resolve()
        name = source_dir.name
        sae = _load_directory(source_dir, device)
    sae = sae.to(device=device, dtype=dtype).eval()
    site = validate_sae(sae, model)
    fingerprint = fingerprint_tensors(sae.state_dict())
    log.info("loaded SAE %s at %s (fingerprint %s)", name, site.hook_name, fingerprint)
    return LoadedSAE(sae, site, fingerprint, name, source_dir)


def load_default_saes(
    model: HookedSAETransformer,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> list[LoadedSAE]:
    """Every SAE shipped for the default model, in name order."""
    names = default_sae_names()
    if not names:
        raise SAELoadError(f"no default SAEs found under {default_sae_root()}")
    return [
        load_sae(SAESpec(source=DEFAULT_PREFIX + n), model, device=device, dtype=dtype)
        for n in names
    ]
