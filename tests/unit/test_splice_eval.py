"""Splice evaluation: an exact SAE changes nothing; spliced sets match sae_lens splicing."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.analyses.linear_parts import AnalysisInputError
from circuitscan.pipelines.analyses.splice_eval import splice_eval
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model, build_tiny_sae


def _identity_sae(model, site):
    """d_sae = 2·d_in, encoder [I, −I], ReLU, decoder [I; −I], no biases: recon == input."""
    sae = build_tiny_sae(model, site)
    d_in = sae.cfg.d_in
    sae = build_tiny_sae(model, site, d_sae=2 * d_in)
    eye = torch.eye(d_in, dtype=sae.W_enc.dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _batch(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (n, 9), generator=gen)
    lengths = torch.tensor([9, 7, 8, 9, 6, 9][:n])
    answer = torch.randint(0, 40, (n,), generator=gen)
    wrong = torch.randint(0, 40, (n,), generator=gen)
    return tokens, lengths, answer, wrong


def test_identity_sae_leaves_metric_unchanged(tiny_model):
    sites = [HookSite(layer=0, point="z"), HookSite(layer=1, point="resid_pre")]
    saes = [_identity_sae(tiny_model, s) for s in sites]
    tokens, lengths, answer, wrong = _batch()
    rows = splice_eval(
        tiny_model, saes, tokens, lengths, MetricSpec(), answer, wrong,
        layer_sets=[["L0.z"], ["L1.resid_pre"], ["L0.z", "L1.resid_pre"]],
        reference_tokens=tokens[:3], reference_lengths=lengths[:3], batch_size=4,
    )  # fmt: skip
    clean = rows[0]
    assert clean.variant == "clean" and clean.sites == []
    assert len(rows) == 1 + 3 * 3
    for row in rows[1:]:
        if row.variant in ("spliced", "error_mean"):
            assert row.metric_mean == pytest.approx(clean.metric_mean, abs=1e-9)
            assert row.kl_metric_pos == pytest.approx(0.0, abs=1e-12)
            assert row.kl_all_pos == pytest.approx(0.0, abs=1e-12)
            assert row.metric_recovered == pytest.approx(1.0, abs=1e-6)
        else:
            assert row.kl_metric_pos > 1e-6  # mean ablation does change the output


def test_spliced_set_matches_sae_lens_sequential_splice():
    model = build_tiny_model(n_layers=2, normalization="RMS")
    saes = [
        build_tiny_sae(model, HookSite(layer=0, point="z"), seed=1),
        build_tiny_sae(model, HookSite(layer=1, point="resid_pre"), seed=2),
    ]
    tokens, lengths, answer, wrong = _batch(1)
    rows = splice_eval(
        model, saes, tokens, lengths, MetricSpec(), answer, wrong,
        layer_sets=[["L0.z", "L1.resid_pre"]], reference_tokens=tokens,
        reference_lengths=lengths, keep_bos=False,
    )  # fmt: skip
    spliced = next(r for r in rows if r.variant == "spliced")
    for sae in saes:
        model.add_sae(sae, use_error_term=False)
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        model.reset_saes()
    expected = metric_per_prompt(logits, MetricSpec(), lengths=lengths, answer=answer, wrong=wrong)
    assert spliced.metric_mean == pytest.approx(float(expected.mean()), abs=1e-9)
    assert spliced.kl_metric_pos > 0


def test_unknown_site_and_attached_sae_raise():
    model = build_tiny_model(n_layers=2)
    sae = build_tiny_sae(model, HookSite(layer=0, point="resid_post"))
    tokens, lengths, answer, wrong = _batch()
    kwargs = dict(reference_tokens=tokens, reference_lengths=lengths)
    with pytest.raises(AnalysisInputError, match="without an SAE"):
        splice_eval(model, [sae], tokens, lengths, MetricSpec(), answer, wrong,
                    layer_sets=[["L1.z"]], **kwargs)  # fmt: skip
    model.add_sae(sae)
    try:
        with pytest.raises(AnalysisInputError, match="detach SAEs"):
            splice_eval(model, [sae], tokens, lengths, MetricSpec(), answer, wrong, **kwargs)
    finally:
        model.reset_saes()


def test_mean_ablation_and_error_mean_match_manual_interventions():
    """Both baselines equal hand-written hooks with means over the reference prompts' tokens."""
    model = build_tiny_model(n_layers=2, normalization="LN")
    site = HookSite(layer=1, point="resid_pre")
    sae = build_tiny_sae(model, site, seed=5)
    tokens, lengths, answer, wrong = _batch(2)
    ref_tokens, ref_lengths, _, _ = _batch(3, n=5)
    rows = splice_eval(
        model, [sae], tokens, lengths, MetricSpec(), answer, wrong,
        reference_tokens=ref_tokens, reference_lengths=ref_lengths, keep_bos=False,
    )  # fmt: skip
    name = site.hook_name
    with torch.no_grad():
        ref = model.run_with_cache(ref_tokens)[1][name]
        real = torch.arange(ref.shape[1])[None] < ref_lengths[:, None]
        mean_act = ref[real].mean(0)
        mean_err = (ref - sae.decode(sae.encode(ref)))[real].mean(0)
        hooks = {
            "mean_ablation": lambda act, hook: mean_act.expand_as(act).clone(),
            "error_mean": lambda act, hook: sae.decode(sae.encode(act)) + mean_err,
        }
        for variant, hook in hooks.items():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
            expected = metric_per_prompt(
                logits, MetricSpec(), lengths=lengths, answer=answer, wrong=wrong
            )
            row = next(r for r in rows if r.variant == variant)
            assert row.metric_mean == pytest.approx(float(expected.mean()), abs=1e-9)
            assert row.kl_metric_pos > 1e-6
