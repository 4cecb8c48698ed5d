"""Token ids → strings for the store commands, without importing transformers or torch.

``transformers`` imports torch, which costs seconds; a point query takes
milliseconds. When the model's tokenizer is on disk as a ``tokenizer.json``
(a Hugging Face directory, or a GGUF model's converted copy), the ``tokenizers``
library decodes it directly, exactly as ``AutoTokenizer(...).decode([id])``
does for the tokenizers this applies to (BPE models, or clean-up turned off).
Anything else goes through :func:`circuitscan.services.model_loading.load_tokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from circuitscan.schemas.models import DEFAULT_MODEL, ModelSpec

Decode = Callable[[Sequence[int]], list[str]]


def _local_tokenizer_dir(spec: ModelSpec) -> Path | None:
    """The directory holding the tokenizer files of ``spec``, when they are already on disk."""
    from circuitscan.services.model_loading import default_gguf_path, gguf_cache_dir

    source = spec.source
    if source == DEFAULT_MODEL or source.endswith(".gguf"):
        gguf = default_gguf_path() if source == DEFAULT_MODEL else Path(source).expanduser()
        return gguf_cache_dir(gguf) if gguf.is_file() else None
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def _cleans_up_spaces(directory: Path, model_type: str) -> bool:
    """Whether transformers would post-process decoded text (WordPiece-style clean-up).

    transformers skips that clean-up for BPE tokenizers unless forced, so only
    a non-BPE tokenizer with clean-up on (or a forced BPE) needs transformers.
    """
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if not config.get("clean_up_tokenization_spaces", False):
        return False
    forced = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    return model_type != "BPE" or bool(config.get(forced, False))


def fast_decoder(spec: ModelSpec | None) -> Decode | None:
    """A ``tokenizers``-only decoder for ``spec``'s tokenizer, or None when one is not exact."""
    from tokenizers import Tokenizer

    directory = _local_tokenizer_dir(spec or ModelSpec())
    if directory is None or not (directory / "tokenizer.json").is_file():
        return None
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if _cleans_up_spaces(directory, type(tokenizer.model).__name__):
        return None
    return lambda ids: [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def token_decoder(spec: ModelSpec | None) -> Decode:
    """One string per token id, as the model's tokenizer decodes each id alone.

    Raises what :func:`load_tokenizer` raises when no tokenizer can be loaded.
    """
    fast = fast_decoder(spec)
    if fast is not None:
        return fast
    from circuitscan.services.model_loading import load_tokenizer

    tokenizer = load_tokenizer(spec)
    return lambda ids: [tokenizer.decode([int(i)]) for i in ids]
