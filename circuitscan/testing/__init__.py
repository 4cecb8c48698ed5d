"""Test fixtures that ship with circuitscan: tiny seeded models, SAEs, stores, and the
ranking-evaluation harness.

For tests, benchmarks, examples and docstrings. Production code
(``circuitscan.schemas``, ``.pipelines``, ``.services`` and the top-level API)
never imports this package; ``tests/unit/test_layers.py`` enforces that.

- :func:`build_tiny_model`, :func:`build_tiny_sae`: seeded random
  HookedSAETransformers (float64 by default, token ids only) and SAEs at a site;
- :func:`build_tiny_language_model`, :func:`tiny_tokenizer`,
  :func:`save_tiny_llama`: the same with a word-level tokenizer that knows the
  IOI vocabulary, in memory or as a Hugging Face folder;
- :func:`write_tiny_store`: a real feature store of a few cached prompts;
- :mod:`circuitscan.testing.evaluation`: AtP/AtP* rankings against exhaustive
  exact patching (recall@K, cost of verified recall) on IOI.
"""

from circuitscan.testing.tiny_language import (
    build_tiny_language_model,
    save_tiny_llama,
    tiny_tokenizer,
)
from circuitscan.testing.tiny_models import build_tiny_model, build_tiny_sae
from circuitscan.testing.tiny_store import write_tiny_store

__all__ = [
    "build_tiny_language_model",
    "build_tiny_model",
    "build_tiny_sae",
    "save_tiny_llama",
    "tiny_tokenizer",
    "write_tiny_store",
]
