"""Splicing SAEs: exact with the error term, a real change without it, always reset."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.sae_splice import SpliceError, spliced
from circuitscan.schemas.hooks import HookSite
from circuitscan.testing import build_tiny_sae

SITES = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_error_term_keeps_logits(tiny_model, tiny_saes, architecture) -> None:
    saes = tiny_saes(tiny_model, SITES, architecture=architecture)
    tokens = _tokens()
    with torch.no_grad():
        plain = tiny_model(tokens)
        with spliced(tiny_model, saes) as model:
            assert set(model.acts_to_saes) == {s.hook_name for s in SITES}
            kept = model(tokens)
            _, cache = model.run_with_cache(tokens)
        with spliced(tiny_model, saes, use_error_term=False):
            replaced = tiny_model(tokens)
        after = tiny_model(tokens)
    assert plain.dtype == torch.float64
    assert (kept - plain).abs().max() < 1e-10
    assert (replaced - plain).abs().max() > 1e-3
    assert (after - plain).abs().max() == 0
    assert tiny_model.acts_to_saes == {}
    # the features really are on the path: their activations are in the cache
    assert cache["blocks.1.attn.hook_z.hook_sae_acts_post"].shape == (3, 10, 32)
    assert cache["blocks.0.hook_resid_post.hook_sae_error"].abs().max() > 0


def test_gqa_hook_z(tiny_gqa_model) -> None:
    sae = build_tiny_sae(tiny_gqa_model, HookSite(layer=1, point="z"))
    tokens = _tokens()
    with torch.no_grad():
        plain = tiny_gqa_model(tokens)
        with spliced(tiny_gqa_model, [sae]):
            kept = tiny_gqa_model(tokens)
    assert (kept - plain).abs().max() < 1e-10


def test_reset_on_error(tiny_model, tiny_saes) -> None:
    saes = tiny_saes(tiny_model, SITES)
    with pytest.raises(RuntimeError, match="boom"), spliced(tiny_model, saes):
        raise RuntimeError("boom")
    assert tiny_model.acts_to_saes == {}


def test_validation_errors(tiny_model, tiny_saes) -> None:
    (sae,) = tiny_saes(tiny_model, [SITES[0]])
    with pytest.raises(SpliceError, match="more than one SAE"), spliced(tiny_model, [sae, sae]):
        pass
    far = build_tiny_sae(tiny_model, HookSite(layer=0, point="resid_post"))
    far.cfg.metadata.hook_name = "blocks.7.hook_resid_post"
    with (
        pytest.raises(SpliceError, match=r"no hook 'blocks\.7\.hook_resid_post'"),
        spliced(tiny_model, [far]),
    ):
        pass
    with spliced(tiny_model, [sae]):
        with pytest.raises(SpliceError, match="already spliced"), spliced(tiny_model, [sae]):
            pass
        assert set(tiny_model.acts_to_saes) == {SITES[0].hook_name}
    assert tiny_model.acts_to_saes == {}
