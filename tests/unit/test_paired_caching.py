"""Paired caches against the attribution engine: the stored terms are the engine's AtP."""

from __future__ import annotations

import torch

from circuitscan.pipelines.attribution import run_atp
from circuitscan.pipelines.attribution.positions import UNDEFINED, end_aligned_map
from circuitscan.pipelines.batching import pad_right
from circuitscan.pipelines.caching import cache_batch
from circuitscan.pipelines.paired_caching import cache_pairs
from circuitscan.pipelines.site_cache import SiteCache
from circuitscan.schemas.attribution import NodeSelection
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec

SITES = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]


def _pairs(extra: int = 0):
    """Clean prompts and corruptions of some of their tokens; ``extra`` tokens more after BOS."""
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 4, 6])
    tokens = torch.randint(1, 40, (3, 7), generator=generator)
    tokens[:, 0] = 1
    corrupted = []
    for row, n in enumerate(lengths.tolist()):
        tokens[row, n:] = 0
        changed = tokens[row, :n].clone()
        flip = torch.rand(n, generator=generator) < 0.4
        flip[0] = False
        changed[flip] = torch.randint(1, 40, (int(flip.sum()),), generator=generator)
        preamble = torch.randint(1, 40, (extra,), generator=generator).tolist()
        corrupted.append([1, *preamble, *changed[1:].tolist()])
    corrupt, corrupt_lengths = pad_right(corrupted)
    return (
        tokens,
        lengths,
        corrupt,
        corrupt_lengths,
        torch.tensor([1, 2, 3]),
        torch.tensor([4, 5, 6]),
    )


def _dense_atp(cache: SiteCache) -> torch.Tensor:
    """[tokens, d_sae] AtP from the stored entries alone: Σ a'·g (corrupted) − Σ a·g (clean)."""
    out = torch.zeros(cache.n_tokens, cache.d_sae, dtype=torch.float64)
    assert cache.corrupt is not None and cache.gradients is not None
    side = cache.corrupt
    out.index_put_(
        (side.token_index, side.feature_ids), side.activations * side.gradients, accumulate=True
    )
    out.index_put_(
        (cache.token_index, cache.feature_ids),
        -cache.activations * cache.gradients,
        accumulate=True,
    )
    return out


def _engine_by_token(result, lengths: torch.Tensor, kind: str, label: str) -> torch.Tensor:
    """The engine's per-prompt scores of one (kind, site) as [real tokens, units]."""
    group = next(i for i, g in enumerate(result.groups) if g.kind == kind and g.site.label == label)
    scores = result.scores[group]  # [batch, positions, units]
    rows = [scores[row, : int(n)] for row, n in enumerate(lengths.tolist())]
    return torch.cat(rows)


def test_stored_terms_equal_engine_atp(tiny_model, tiny_saes):
    """Per (token, feature) and per token's error node, on equal-length and end-aligned pairs."""
    saes = tiny_saes(tiny_model, SITES)
    nodes = NodeSelection(kinds=["feature", "sae_error"], positions="all")
    for longer in (0, 2):
        tokens, lengths, corrupt, corrupt_lengths, answer, wrong = _pairs(longer)
        position_map = (
            end_aligned_map(lengths, corrupt_lengths, tokens.shape[1]) if longer else None
        )
        sites, paired = cache_pairs(
            tiny_model, saes, tokens, lengths, corrupt, corrupt_lengths, MetricSpec(),
            answer=answer, wrong=wrong, position_map=position_map,
        )  # fmt: skip
        result = run_atp(
            tiny_model, saes, tokens, corrupt, lengths, MetricSpec(), answer, wrong, nodes,
            corrupt_lengths=corrupt_lengths, position_map=position_map,
        )  # fmt: skip
        for site in SITES:
            cache = sites[site.label]
            expected = _engine_by_token(result, lengths, "feature", site.label)
            torch.testing.assert_close(_dense_atp(cache), expected, rtol=1e-9, atol=1e-12)
            assert cache.corrupt is not None
            errors = _engine_by_token(result, lengths, "sae_error", site.label)[:, 0]
            torch.testing.assert_close(cache.corrupt.error_atp, errors, rtol=1e-9, atol=1e-12)
            assert bool((cache.corrupt.error_atp != 0).any())
        # Paired positions: the same index, or counted from the end (BOS with BOS).
        real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        expected_map = end_aligned_map(lengths, corrupt_lengths, tokens.shape[1])[real]
        assert torch.equal(paired, expected_map)
        assert int((paired == UNDEFINED).sum()) == 0


def test_clean_side_equals_a_plain_cache(tiny_model, tiny_saes):
    saes = tiny_saes(tiny_model, SITES)
    tokens, lengths, corrupt, corrupt_lengths, answer, wrong = _pairs()
    sites, _ = cache_pairs(
        tiny_model, saes, tokens, lengths, corrupt, corrupt_lengths, MetricSpec(),
        answer=answer, wrong=wrong, top_k=3,
    )  # fmt: skip
    plain = cache_batch(
        tiny_model, saes, tokens, lengths, MetricSpec(), answer=answer, wrong=wrong, top_k=3
    )
    for label, cache in sites.items():
        other = plain[label]
        for name in ("token_index", "feature_ids", "activations", "gradients", "error_norm"):
            torch.testing.assert_close(getattr(cache, name), getattr(other, name))
        assert cache.corrupt is not None
        # top-k applies to the corrupted side too: at most 3 entries per token.
        counts = torch.bincount(cache.corrupt.token_index, minlength=cache.n_tokens)
        assert int(counts.max()) <= 3
