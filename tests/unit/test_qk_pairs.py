"""The QK pair table (with error and bias terms) sums exactly to the attention score."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.analyses.linear_parts import AnalysisInputError
from circuitscan.pipelines.analyses.qk_pairs import qk_feature_pairs, qk_pair_variance
from circuitscan.schemas.analyses import QKPairTable
from circuitscan.schemas.hooks import HookSite
from circuitscan.testing import build_tiny_model, build_tiny_sae

MODELS = {
    "LN-standard": dict(normalization="LN"),
    "RMS-rotary": dict(normalization="RMS", positional="rotary"),
    "RMS-rotary-GQA": dict(normalization="RMS", n_key_value_heads=2, positional="rotary"),
}


@pytest.mark.parametrize("kind", MODELS)
def test_table_sums_to_attention_score(kind):
    model = build_tiny_model(n_layers=2, **MODELS[kind])
    sae = build_tiny_sae(model, HookSite(layer=0, point="resid_post"), seed=3)
    key_sae = build_tiny_sae(model, HookSite(layer=1, point="resid_pre"), seed=4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 40, (8,), generator=gen)
        scores = model.run_with_cache(tokens[None])[1]["blocks.1.attn.hook_attn_scores"][0]
        for head, dest, src in [(0, 7, 2), (3, 5, 5), (1, 6, 0)]:
            table = qk_feature_pairs(model, sae, tokens, 1, head, dest, src, key_sae=key_sae)
            total = float(torch.tensor(table.table, dtype=torch.float64).sum())
            assert total == pytest.approx(float(scores[head, dest, src]), abs=1e-9)
            assert table.score == pytest.approx(total, abs=1e-12)
            assert table.query_labels[-3:] == ["error", "b_dec", "bias"]
            assert QKPairTable.model_validate_json(table.model_dump_json()) == table


def test_variance_explained_reaches_one_with_all_pairs():
    model = build_tiny_model(n_layers=2, normalization="RMS", positional="rotary")
    sae = build_tiny_sae(model, HookSite(layer=1, point="resid_pre"), d_sae=8, seed=1)
    gen = torch.Generator().manual_seed(2)
    tables = [
        qk_feature_pairs(model, sae, torch.randint(0, 40, (6,), generator=gen), 1, 2, 5, 1)
        for _ in range(6)
    ]
    n_pairs = len({(q, k) for t in tables for q in t.query_labels for k in t.key_labels})
    result = qk_pair_variance(tables, top_n=n_pairs)
    assert result.fraction_explained[-1] == pytest.approx(1.0, abs=1e-9)
    assert len(result.top_pairs) == n_pairs
    # Var(score) = Σ_p Cov(c_p, score): the shares of all pairs sum to one, largest first.
    assert sum(result.variance_share) == pytest.approx(1.0, abs=1e-9)
    assert result.variance_share == sorted(result.variance_share, reverse=True)
    # The top pair alone explains exactly what removing it from the score says it does.
    q, k, _ = result.top_pairs[0]
    top = torch.tensor(
        [t.table[t.query_labels.index(q)][t.key_labels.index(k)]
         if q in t.query_labels and k in t.key_labels else 0.0 for t in tables],
        dtype=torch.float64,
    )  # fmt: skip
    scores = torch.tensor([t.score for t in tables], dtype=torch.float64)
    expected = 1 - float((scores - top).var() / scores.var())
    assert result.fraction_explained[0] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(AnalysisInputError, match="two prompts"):
        qk_pair_variance(tables[:1])


def test_bad_inputs_raise():
    model = build_tiny_model(n_layers=2)
    sae = build_tiny_sae(model, HookSite(layer=0, point="resid_pre"))
    tokens = torch.arange(6)
    with pytest.raises(AnalysisInputError, match="does not read the input of layer 1"):
        qk_feature_pairs(model, sae, tokens, 1, 0, 5, 1)
    with pytest.raises(AnalysisInputError, match="src_pos"):
        qk_feature_pairs(model, sae, tokens, 0, 0, 1, 3)
    z_sae = build_tiny_sae(model, HookSite(layer=0, point="z"))
    with pytest.raises(AnalysisInputError, match="residual-stream SAE"):
        qk_feature_pairs(model, z_sae, tokens, 0, 0, 4, 1)


def test_rescaled_topk_sae_rows_are_its_active_features():
    model = build_tiny_model(n_layers=2, normalization="RMS")
    sae = build_tiny_sae(model, HookSite(layer=1, point="resid_pre"), architecture="topk", k=5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.W_dec.shape[0], dtype=torch.float64)[:, None])
    sae.cfg.rescale_acts_by_decoder_norm = True
    tokens = torch.randint(0, 40, (7,), generator=torch.Generator().manual_seed(5))
    cache = model.run_with_cache(tokens[None])[1]
    head, dest, src = 2, 6, 3
    table = qk_feature_pairs(model, sae, tokens, 1, head, dest, src)
    score = float(cache["blocks.1.attn.hook_attn_scores"][0, head, dest, src])
    assert table.score == pytest.approx(score, abs=1e-9)
    x = cache["blocks.1.hook_resid_pre"][0, dest]
    acts = sae.encode(x[None])[0]
    assert table.query_labels[:-3] == [f"f{int(j)}" for j in torch.nonzero(acts).flatten()]
    # The error row is the SAE's true error (x − reconstruction) read by the query, so no
    # feature mass hides in it: compute it by hand from the cached key.
    attn = model.blocks[1].attn
    error = x - sae.decode(acts[None])[0]
    sigma = cache["blocks.1.ln1.hook_scale"][0, dest]
    q_err = (error / sigma * model.blocks[1].ln1.w) @ attn.W_Q[head]
    k = cache["blocks.1.attn.hook_k"][0, src, head]
    row = table.table[table.query_labels.index("error")]
    assert sum(row) == pytest.approx(float((q_err @ k / attn.attn_scale).detach()), abs=1e-9)


def test_batch_of_padded_prompts_matches_single_prompts():
    from circuitscan.pipelines.analyses.qk_pairs import qk_feature_pairs_batch

    model = build_tiny_model(n_layers=2, normalization="RMS", n_key_value_heads=2,
                             positional="rotary")  # fmt: skip
    sae = build_tiny_sae(model, HookSite(layer=1, point="resid_pre"), seed=6)
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 40, (3, 9), generator=gen)
    lengths = torch.tensor([9, 6, 7])
    tokens[1, 6:] = 0  # padding
    dests, srcs = [8, 5, 6], [2, 5, 0]
    batch = qk_feature_pairs_batch(model, sae, tokens, lengths, 1, 3, dests, srcs)
    for b, table in enumerate(batch):
        single = qk_feature_pairs(model, sae, tokens[b, : lengths[b]], 1, 3, dests[b], srcs[b])
        assert table.query_labels == single.query_labels
        assert table.key_labels == single.key_labels
        assert torch.allclose(
            torch.tensor(table.table), torch.tensor(single.table), rtol=0, atol=1e-10
        )
    with pytest.raises(AnalysisInputError, match="src_pos ≤ dest_pos < 6"):
        qk_feature_pairs_batch(model, sae, tokens, lengths, 1, 3, [8, 7, 6], srcs)
