"""AtP* ranks by unsigned GradDrop scores but keeps signed estimates for verification."""

from __future__ import annotations

import torch

from circuitscan.pipelines.attribution import exact_patch, run_atp
from circuitscan.schemas.attribution import AttributionMethod, NodeSelection
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model


def test_atpstar_signed_estimates_match_exact_patching_on_linear_paths() -> None:
    model = build_tiny_model(normalization=None, attn_only=True, n_layers=3)
    generator = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 40, (4, 6), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(0, 40, (4,), generator=generator)
    lengths = torch.full((4,), 6)
    answer, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    selection = NodeSelection(kinds=["z", "q", "k"], layers=[2])
    star = run_atp(
        model, None, clean, corrupt, lengths, MetricSpec(), answer, wrong, selection,
        method=AttributionMethod(qk_fix=True, graddrop=True),
    )  # fmt: skip
    exact = exact_patch(
        model, None, clean, lengths, MetricSpec(), answer, wrong, star.nodes(),
        corrupt_tokens=corrupt,
    )  # fmt: skip
    ranking, signed = star.per_prompt(), star.per_prompt_signed()
    assert bool((ranking.nan_to_num(0) >= 0).all())
    # Last-layer nodes: the QK-fixed estimate is exact, sign included ...
    torch.testing.assert_close(signed, exact, atol=1e-9, rtol=0, equal_nan=True)
    assert bool((exact.nan_to_num(0) < -1e-3).any()), "some patches must lower the metric"
    # ... the ranking score is its magnitude, and mean() reports the signed one.
    torch.testing.assert_close(ranking, exact.abs(), atol=1e-9, rtol=0, equal_nan=True)
    torch.testing.assert_close(star.mean(), exact.nanmean(0), atol=1e-9, rtol=0)
