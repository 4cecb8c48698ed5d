"""Shared fixtures. No network: the hub is off for every test."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch

from circuitscan.pipelines.tiny_models import build_tiny_model, build_tiny_sae
from circuitscan.schemas.hooks import HookSite


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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
