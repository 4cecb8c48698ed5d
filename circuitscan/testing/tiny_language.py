"""A tiny model that reads text: a word-level tokenizer over the IOI vocabulary.

Text prompts, answer strings and the IOI generator need a tokenizer; the real
ones take seconds to load. This one is built in memory (saved once per process
to a temporary folder, because TransformerLens reloads tokenizers by path) and
knows every word of the IOI templates, names, places and objects, each with
and without its leading space, like a BPE vocabulary. Other words map to an
unknown token.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch
from sae_lens import HookedSAETransformer

from circuitscan.pipelines.tasks.ioi import NAMES, OBJECTS, PLACES
from circuitscan.testing.tiny_models import build_tiny_model

BOS, PAD, UNK = "<|bos|>", "<|pad|>", "<|unk|>"
# The words of the IOI templates and of short example sentences.
WORDS: tuple[str, ...] = (
    "When", "Then", "After", "While", "and", "went", "to", "the", "gave", "a", "got", "at",
    "decided", "give", "it", "were", "working", "had", "long", "day", "handed", "The", "is",
    "of", "in", "on", "cat", "dog", "sat", "mat", "ran", ",", ".", "!", "?",
)  # fmt: skip


def _vocabulary() -> dict[str, int]:
    vocab = {BOS: 0, PAD: 1, UNK: 2}
    for word in (*WORDS, *NAMES, *PLACES, *OBJECTS):
        # "Ġ" is the byte-level pre-tokenizer's spelling of a leading space.
        for form in (word, "Ġ" + word):
            vocab.setdefault(form, len(vocab))
    return vocab


@functools.cache
def _tokenizer_dir() -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(_vocabulary(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=PAD, unk_token=UNK
    )
    directory = Path(tempfile.mkdtemp(prefix="circuitscan-tiny-tokenizer-"))
    wrapped.save_pretrained(directory)
    return directory


def tiny_tokenizer() -> Any:
    """A fresh Hugging Face tokenizer over the tiny vocabulary (BOS id 0, pad id 1)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir())


def build_tiny_language_model(*, seed: int = 0, **kwargs: Any) -> HookedSAETransformer:
    """``build_tiny_model`` with the tiny tokenizer attached (``d_vocab`` set to fit it).

    ``kwargs`` go to :func:`build_tiny_model` (layers, widths, dtype, ...).
    """
    tokenizer = tiny_tokenizer()
    model = build_tiny_model(d_vocab=len(tokenizer), seed=seed, **kwargs)
    model.set_tokenizer(tokenizer, default_padding_side="right")
    model.cfg.default_prepend_bos = True
    return model


def save_tiny_llama(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny random Llama saved as a Hugging Face folder (config.json, safetensors,
    the tiny tokenizer), loadable like any user model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
