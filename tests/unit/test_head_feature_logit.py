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
from circuitscan.pipelines.tiny_models import build_tiny_model, build_tiny_sae
from circuitscan.schemas.hooks import HookSite


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
    return float(logits[0, dest, answer] - logits[0, dest, wrong]), cache


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
