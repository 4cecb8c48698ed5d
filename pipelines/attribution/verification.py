"""Verification of estimated rankings by exact patching: recall@K, cost of verified recall.

Nodes are ranked by the mean over prompts of the absolute per-prompt effect
(estimate and truth alike). *Cost of verified recall* is how many nodes one
patches exactly, in estimated order, until every true top-K node has been
patched (AtP* paper): 1·K at best, n_nodes at worst.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float

from circuitscan.pipelines.attribution.errors import AttributionInputError
from circuitscan.schemas.attribution import VerificationReport


def _ranking(values: torch.Tensor) -> torch.Tensor:
    return torch.argsort(values.abs().nan_to_num(-1.0), descending=True, stable=True)


def recall_at_k(
    estimate: Float[torch.Tensor, " n_nodes"], truth: Float[torch.Tensor, " n_nodes"], k: int
) -> float:
    """Share of the true top-K (by |truth|) among the estimated top-K (by |estimate|)."""
    _check(estimate, truth, k)
    top_true = set(_ranking(truth)[:k].tolist())
    top_est = set(_ranking(estimate)[:k].tolist())
    return len(top_true & top_est) / k


def verify(
    estimate: Float[torch.Tensor, " n_nodes"],
    truth: Float[torch.Tensor, " n_nodes"],
    k: int,
    budget: int | None = None,
) -> VerificationReport:
    """Recall@K and the cost (nodes patched) of verifying the true top-K in estimated order."""
    _check(estimate, truth, k)
    budget = len(estimate) if budget is None else budget
    top_true = set(_ranking(truth)[:k].tolist())
    order = _ranking(estimate)[:budget].tolist()
    found, cost = 0, None
    for rank, node in enumerate(order, start=1):
        if node in top_true:
            found += 1
            if found == k:
                cost = rank
                break
    return VerificationReport(
        k=k,
        recall_at_k=recall_at_k(estimate, truth, k),
        cost_of_verified_recall=cost,
        found=found,
        budget=budget,
    )


def verify_by_patching(
    estimate: Float[torch.Tensor, " n_nodes"],
    patch: Callable[[Sequence[int]], Float[torch.Tensor, "batch n"]],
    k: int,
    budget: int,
    *,
    chunk: int = 32,
) -> tuple[list[int], Float[torch.Tensor, " n_verified"]]:
    """Patch nodes exactly in estimated order until the top-K is confirmed or ``budget`` spent.

    ``patch(indices)`` returns the exact per-prompt Δm of those nodes (e.g. a
    closure over :func:`exact_patch`). The top-K of the verified nodes counts
    as confirmed once its smallest mean |Δm| exceeds the largest mean
    |estimate| of every node not yet patched — exact when estimates do not
    underestimate, a stopping heuristic otherwise. Returns the patched node
    indices (in order) and their mean |Δm|.
    """
    if k < 1 or budget < 1:
        raise AttributionInputError("k and budget must be positive")
    order = _ranking(estimate).tolist()
    sorted_abs = estimate.abs().nan_to_num(0.0)[order]
    done: list[int] = []
    effects: list[torch.Tensor] = []
    while len(done) < min(budget, len(order)):
        batch = order[len(done) : min(len(done) + chunk, budget, len(order))]
        effects.append(patch(batch).abs().nanmean(0))
        done.extend(batch)
        verified = torch.cat(effects)
        remaining = float(sorted_abs[len(done)]) if len(done) < len(order) else 0.0
        if len(done) >= k and float(verified.topk(k).values.min()) > remaining:
            break
    return done, torch.cat(effects) if effects else torch.empty(0)


def _check(estimate: torch.Tensor, truth: torch.Tensor, k: int) -> None:
    if estimate.shape != truth.shape or estimate.ndim != 1:
        raise AttributionInputError(
            f"estimate {tuple(estimate.shape)} and truth {tuple(truth.shape)} must be equal 1-d"
        )
    if not 1 <= k <= estimate.shape[0]:
        raise AttributionInputError(f"k={k} must be in 1..{estimate.shape[0]}")
