"""Head→feature→logit equals an intervention through one head's OV path (frozen pattern/norms)."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.analyses.head_feature_logit import (
    feature_direction,
    frozen_norm_scales,
    head_feature_logit,
)
from circuitscan.pipelines.analyses.linear_parts import AnalysisInputError
from circuitscan.schemas.hooks import HookSite
from circuitscan.testing import build_tiny_model, build_tiny_sae


def _intervened_logit_diff(model, tokens, direction, head, src, dest, answer, wrong, eps):
    """Add eps·direction to the value input of one head at src, everything else frozen."""
    _, cache = model.run_with_cache(tokens[None])
    model.set_use_split_qkv_input(True)
    try:

        def add(v_in, hook):
            v_in = v_in.clone()
            v_in[0, src, head] += eps * direction
            return v_in

        def freeze(name):
            def fn(act, hook):
                return (
                    cache[name].reshape((*act.shape[:2], -1)).unsqueeze(-1).expand_as(act)
                    if act.dim() == 4
                    else cache[name].expand_as(act)
                )

            return fn

        hooks = [
            ("blocks.1.hook_v_input", add),
            ("blocks.1.attn.hook_pattern", lambda a, hook: cache["blocks.1.attn.hook_pattern"]),
        ]
        for name in ("blocks.1.ln1.hook_scale", "ln_final.hook_scale"):
            if name in cache:
                hooks.append((name, freeze(name)))
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    finally:
        model.set_use_split_qkv_input(False)
    return float((logits[0, dest, answer] - logits[0, dest, wrong]).detach()), cache


@pytest.mark.parametrize("normalization", ["LN", "RMS"])
def test_head_feature_logit_matches_intervention(normalization):
    model = build_tiny_model(n_layers=2, attn_only=True, normalization=normalization)
    sae = build_tiny_sae(model, HookSite(layer=0, point="resid_post"), seed=1)
    tokens = torch.randint(0, 40, (7,), generator=torch.Generator().manual_seed(3))
    src, dest, answer, wrong, feature = 2, 6, 5, 11, 4
    direction, first = feature_direction(model, sae, feature)
    assert first == 1
    final_scale, input_scales = frozen_norm_scales(model, tokens, src, dest)
    result = head_feature_logit(
        model, sae, feature, answer, wrong, final_scale, input_scales=input_scales
    )
    assert len(result.heads) == model.cfg.n_heads
    with torch.no_grad():
        base = model(tokens[None])[0, dest]
    base_diff = float(base[answer] - base[wrong])
    for effect in result.heads:
        changed, cache = _intervened_logit_diff(
            model, tokens, direction, effect.head, src, dest, answer, wrong, eps=0.7
        )
        weight = float(cache["blocks.1.attn.hook_pattern"][0, effect.head, dest, src])
        assert changed - base_diff == pytest.approx(0.7 * weight * effect.logit_diff, abs=1e-9)
    diffs = [abs(e.logit_diff) for e in result.heads]
    assert diffs == sorted(diffs, reverse=True)
    top = result.heads[0]
    assert top.top_tokens[0].logit >= top.top_tokens[-1].logit


def test_head_feature_logit_gqa_and_z_sae():
    model = build_tiny_model(
        n_layers=2, normalization="RMS", n_key_value_heads=2, positional="rotary"
    )
    sae = build_tiny_sae(model, HookSite(layer=0, point="z"), seed=2)
    result = head_feature_logit(model, sae, 3, 1, 2, 1.3)
    assert {(e.layer, e.head) for e in result.heads} == {(1, h) for h in range(4)}
    # Query heads sharing a KV head differ only through W_O, so their effects differ.
    assert len({round(e.logit_diff, 12) for e in result.heads}) == 4


def test_bad_inputs_raise():
    model = build_tiny_model(n_layers=2)
    sae = build_tiny_sae(model, HookSite(layer=0, point="resid_pre"))
    with pytest.raises(AnalysisInputError, match="vocabulary"):
        head_feature_logit(model, sae, 0, 999, 1, 1.0)
    with pytest.raises(AnalysisInputError, match="out of range"):
        head_feature_logit(model, sae, 10_000, 0, 1, 1.0)


def test_feature_attributions_match_a_nudge_along_the_feature():
    """a_i·(d_i·∂m/∂x) equals the metric's derivative when the feature's contribution grows."""
    from circuitscan.pipelines.analyses.feature_choice import feature_attributions
    from circuitscan.schemas.metrics import MetricSpec

    model = build_tiny_model(n_layers=2, normalization="RMS", positional="rotary")
    site = HookSite(layer=0, point="z")
    sae = build_tiny_sae(model, site, architecture="topk", k=6, seed=3)
    sae.cfg.rescale_acts_by_decoder_norm = True
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 1.5, sae.W_dec.shape[0], dtype=torch.float64)[:, None])
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(7))
    lengths, positions = torch.tensor([8, 6]), torch.tensor([5, 3])
    answer, wrong = torch.tensor([3, 9]), torch.tensor([4, 1])
    acts, attr = feature_attributions(
        model, sae, tokens, lengths, positions, MetricSpec(), answer, wrong
    )
    eps = 1e-6
    for b in range(2):
        feature = int(acts[b].argmax())
        # The feature's share of the reconstruction, as sae_lens decodes it.
        one = torch.zeros_like(acts[b])
        one[feature] = acts[b, feature]
        share = sae.decode(one[None])[0] - sae.decode(torch.zeros_like(one)[None])[0]

        def nudge(act, hook, b=b, share=share):
            act = act.clone()
            act[b, positions[b]] += eps * share
            return act

        with torch.no_grad():
            base = model(tokens)[b, lengths[b] - 1]
            moved = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name, nudge)])
        moved = moved[b, lengths[b] - 1]
        derivative = (
            float(moved[answer[b]] - moved[wrong[b]]) - float(base[answer[b]] - base[wrong[b]])
        ) / eps
        assert derivative == pytest.approx(float(attr[b, feature]), rel=1e-4, abs=1e-7)
