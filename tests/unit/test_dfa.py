"""DFA sums exactly to the feature's pre-activation; each recursive step sums to its parent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuitscan.pipelines.analyses.dfa import Pruning, check_tree_sums, dfa, recursive_dfa
from circuitscan.pipelines.analyses.linear_parts import AnalysisInputError, sae_pre_flat
from circuitscan.schemas.analyses import DFANode
from circuitscan.schemas.hooks import HookSite
from circuitscan.testing import build_tiny_model, build_tiny_sae

MODELS = {
    "LN-standard": dict(normalization="LN"),
    "RMS-rotary-GQA": dict(normalization="RMS", n_key_value_heads=2, positional="rotary"),
}


def _setup(kind):
    model = build_tiny_model(n_layers=3, **MODELS[kind])
    saes = [build_tiny_sae(model, HookSite(layer=k, point="z"), seed=k) for k in range(3)]
    saes.append(build_tiny_sae(model, HookSite(layer=1, point="resid_post"), seed=9))
    tokens = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(1))
    return model, saes, tokens


def _true_pre(model, sae, tokens, layer, feature, dest):
    """The pre-activation the SAE computes when spliced into the model (error term kept)."""
    model.add_sae(sae, use_error_term=True)
    try:
        _, cache = model.run_with_cache(tokens[None])
    finally:
        model.reset_saes()
    return float(cache[f"blocks.{layer}.attn.hook_z.hook_sae_acts_pre"][0, dest, feature])


@pytest.mark.parametrize("kind", MODELS)
def test_dfa_sums_to_pre_activation(kind):
    model, saes, tokens = _setup(kind)
    for feature in range(0, 32, 5):
        result = dfa(model, saes, tokens, feature, layer=2, dest_pos=8)
        total = float(np.sum(result.contributions)) + result.bias
        assert total == pytest.approx(result.pre_activation, abs=1e-9)
        truth = _true_pre(model, saes[2], tokens, 2, feature, 8)
        assert result.pre_activation == pytest.approx(truth, abs=1e-9)
    assert len(result.contributions) == model.cfg.n_heads
    assert all(c == 0.0 for row in result.contributions for c in row[9:])


def _walk(node: DFANode):
    yield node
    for child in node.children:
        yield from _walk(child)


@pytest.mark.parametrize("kind", MODELS)
def test_recursive_dfa_each_step_sums_to_parent(kind):
    model, saes, tokens = _setup(kind)
    sae = saes[2]
    z = model.run_with_cache(tokens[None])[1]["blocks.2.attn.hook_z"][0, 8]
    feature = int(sae_pre_flat(sae, z.flatten()).argmax())
    tree = recursive_dfa(
        model, saes, tokens, feature, 2, 8, Pruning(max_depth=6, top_k=6, min_frac=0.0)
    )
    assert tree.value == pytest.approx(_true_pre(model, sae, tokens, 2, feature, 8), abs=1e-9)
    assert check_tree_sums(tree) < 1e-9
    kinds = {n.kind for n in _walk(tree)}
    # The tree reaches residual SAE features, upstream attention features, and the tokens.
    assert {"head_source", "resid_feature", "sae_error"} <= kinds
    assert "attn_feature" in {n.kind for n in _walk(tree) if n is not tree}
    assert "embed" in kinds
    # JSON round trip for the store.
    assert DFANode.model_validate_json(tree.model_dump_json()) == tree


def test_recursive_dfa_without_resid_sae_uses_components():
    model, saes, tokens = _setup("LN-standard")
    tree = recursive_dfa(model, saes[:3], tokens, 1, 1, 5, Pruning(max_depth=3, top_k=50))
    assert check_tree_sums(tree) < 1e-9
    kinds = {n.kind for n in _walk(tree)}
    assert {"embed", "pos_embed", "mlp_out"} <= kinds


def test_pruning_bounds_width_and_depth():
    model, saes, tokens = _setup("LN-standard")
    tree = recursive_dfa(model, saes, tokens, 3, 2, 8, Pruning(max_depth=2, top_k=3))
    assert len(tree.children) <= 4
    assert all(not g.children for c in tree.children for g in c.children)


def test_dfa_rejects_missing_sae_and_bad_position():
    model, saes, tokens = _setup("LN-standard")
    with pytest.raises(AnalysisInputError, match="no hook_z SAE"):
        dfa(model, saes[3:], tokens, 0, 2, 3)
    with pytest.raises(AnalysisInputError, match="outside the prompt"):
        dfa(model, saes, tokens, 0, 2, 30)


def _rescaled_topk_sae(model, site, seed):
    """A TopK SAE that rescales by decoder norms (as the default SAEs do), with uneven norms."""
    sae = build_tiny_sae(model, site, architecture="topk", k=6, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_dec.mul_(0.5 + torch.rand(sae.W_dec.shape[0], 1, generator=gen, dtype=torch.float64))
    sae.cfg.rescale_acts_by_decoder_norm = True
    return sae


def test_dfa_with_decoder_norm_rescaling_topk_saes():
    model = build_tiny_model(n_layers=3, normalization="RMS", n_key_value_heads=2,
                             positional="rotary")  # fmt: skip
    saes = [_rescaled_topk_sae(model, HookSite(layer=k, point="z"), k) for k in range(3)]
    tokens = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(4))
    z = model.run_with_cache(tokens[None])[1]["blocks.2.attn.hook_z"][0, 8]
    acts = saes[2].encode(z[None])[0].detach()
    feature = int(acts.argmax())
    result = dfa(model, saes, tokens, feature, layer=2, dest_pos=8)
    # For an active TopK feature the (folded) pre-activation is the activation sae_lens reports.
    assert result.activation == pytest.approx(float(acts[feature]), abs=1e-9)
    assert result.pre_activation == pytest.approx(result.activation, abs=1e-9)
    total = float(np.sum(result.contributions)) + result.bias
    assert total == pytest.approx(result.pre_activation, abs=1e-9)
    tree = recursive_dfa(model, saes, tokens, feature, 2, 8, Pruning(max_depth=4, top_k=40))
    assert check_tree_sums(tree) < 1e-9
    # Upstream TopK features are expanded (activation == pre-activation after folding).
    upstream = [n for n in _walk(tree) if n.kind == "attn_feature" and n is not tree]
    assert upstream and any(n.children for n in upstream)
    assert saes[2].cfg.rescale_acts_by_decoder_norm  # the caller's SAE is left untouched


def test_dfa_features_share_one_pass_and_pick_the_most_active():
    from circuitscan.pipelines.analyses.dfa import dfa_features

    model, saes, tokens = _setup("RMS-rotary-GQA")
    picked = dfa_features(model, saes, tokens, layer=2, dest_pos=8, top=3)
    acts = [r.activation for r in picked]
    assert len(picked) == 3 and acts == sorted(acts, reverse=True) and acts[-1] > 0
    # Every other feature is no more active than the third pick.
    everything = dfa_features(model, saes, tokens, 2, 8, features=range(saes[2].cfg.d_sae))
    others = [r.activation for r in everything if r.feature not in {p.feature for p in picked}]
    assert max(others) <= acts[-1]
    for result in picked:
        alone = dfa(model, saes, tokens, result.feature, layer=2, dest_pos=8)
        assert result == alone
    with pytest.raises(AnalysisInputError, match=r"features \[999\] out of range"):
        dfa_features(model, saes, tokens, 2, 8, features=[0, 999])
