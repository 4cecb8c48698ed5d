"""Shared fixtures. No network: the hub is off for every test."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A warm pool someone left running (`circuitscan up`) must not run the tests' jobs;
# the warm-pool tests turn it back on for the processes they start.
os.environ["CIRCUITSCAN_NO_POOL"] = "1"

import pytest
import torch

from circuitscan.schemas.hooks import HookSite
from circuitscan.testing import build_tiny_model, build_tiny_sae


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _runtime_type_checks(request):
    """jaxtyping + beartype check every pipelines call (pyproject's addopts), except in
    tests marked ``unchecked_types``: those feed deliberately wrong inputs to check the
    messages the functions themselves give users, who run without these checks."""
    if request.node.get_closest_marker("unchecked_types") is None:
        yield
        return
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(params=["LN", "RMS"])
def tiny_model(request):
    """A float64 two-layer model, LayerNorm and RMSNorm variants."""
    return build_tiny_model(normalization=request.param)


@pytest.fixture
def tiny_gqa_model():
    """Grouped-query attention (4 query heads sharing 2 key/value heads), RMSNorm, rotary."""
    return build_tiny_model(normalization="RMS", n_key_value_heads=2, positional="rotary")


@pytest.fixture
def tiny_saes():
    """Factory: tiny SAEs for a model at the given sites."""

    def make(model, sites: list[HookSite], **kwargs):
        return [build_tiny_sae(model, site, seed=i, **kwargs) for i, site in enumerate(sites)]

    return make


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session."""
    from circuitscan.services.model_loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_hf_model_dir(tmp_path_factory):
    """A real local Hugging Face directory: a tiny random Llama with the default tokenizer.

    Exercises the same loading path as any user model (config.json +
    safetensors → TransformerLens conversion), and has a real tokenizer so
    text prompt sources and jobs work end to end in seconds.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitscan.services.model_loading import load_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_sae_dirs(tiny_hf_model_dir, tmp_path_factory):
    """sae_lens SAE directories for the tiny Llama: a residual SAE at layer 0 and a z SAE at layer 1."""
    from circuitscan.schemas.models import ModelSpec
    from circuitscan.services.model_loading import load_model

    model = load_model(ModelSpec(source=str(tiny_hf_model_dir))).model
    dirs = []
    for index, site in enumerate(
        [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]
    ):
        sae = build_tiny_sae(model, site, d_sae=48, seed=index, dtype=torch.float32)
        path = tmp_path_factory.mktemp(f"sae_{site.label}")
        sae.save_model(path)
        dirs.append(path)
    return dirs
