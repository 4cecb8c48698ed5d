"""Statistics of certified verification: subset draws, per-pair bounds, per-node sums.

Kept apart from the patching (certify.py) so a job cut into shards can sum
each shard's per-node figures and build one result: every (node, prompt)
bound uses one union size fixed up front, and a node's bound is the mean of
its per-prompt bounds, so sums over shards are exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from circuitscan.pipelines.attribution.errors import AttributionInputError
from circuitscan.schemas.attribution import Node
from circuitscan.schemas.certification import CertificationResult, CertifiedNode

MAX_DF = 200  # t quantiles fall with df: capping it only widens the bound


def _t_two_sided_inside(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(2, df, 2):  # (1·3···(j−1))/(2·4···j) cos^j θ
            term *= c2 * (j - 1) / j
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term = math.cos(theta)
    total = term
    for j in range(3, df, 2):  # (2·4···(j−1))/(1·3···j) cos^j θ
        term *= c2 * (j - 1) / j
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


@functools.lru_cache(maxsize=4096)
def t_quantile_two_sided(tail: float, df: int) -> float:
    """The t with P(|T| > t) = ``tail`` for Student's t with ``df`` degrees of freedom."""
    if not 0.0 < tail < 1.0 or df < 1:
        raise AttributionInputError(f"t quantile needs tail in (0, 1) and df ≥ 1: {tail}, {df}")
    lo, hi = 0.0, 1.0
    while 1.0 - _t_two_sided_inside(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - _t_two_sided_inside(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def draw_subsets(n_nodes: int, samples: int, p: float, seed: int) -> Bool[torch.Tensor, "S n"]:
    """Row s: which nodes subset s patches (each independently with probability ``p``)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((samples, n_nodes), generator=generator, dtype=torch.float64) < p


def subset_bounds(
    delta_m: Float[torch.Tensor, "S batch"],
    subsets: Bool[torch.Tensor, "S n"],
    known_zero: Bool[torch.Tensor, "batch n"],
    undefined: Bool[torch.Tensor, "batch n"],
    delta: float,
    union_size: int | None = None,
    control: torch.Tensor | None = None,  # [batch, n], checked below
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (prompt, node): difference-of-means estimate and its Bonferroni upper bound on |c|.

    Returns (estimate, upper, counted) as [batch, n]; ``upper`` is inf where a
    node was in (or out of) fewer than 2 subsets, NaN where undefined.
    ``union_size``: the number of bounds the union bound covers (default: the
    pairs counted here, i.e. neither known zero nor undefined).

    ``control``: a per-(prompt, node) estimate fixed before the subsets were
    drawn (e.g. AtP*'s scores), used as a control variate: each row's Δm less
    the sum of the control over the nodes it patched, the difference of means
    of that residual, plus the node's control. The subsets are independent of
    the control, so the estimate's expectation is the plain estimator's (the
    node's effect under additivity); only its variance changes, from the
    spread of the other nodes' effects to the spread of their errors.
    """
    y = delta_m.to(torch.float64)
    inside = subsets.to(torch.float64)
    n_in = inside.sum(0)  # [n]
    n_out = subsets.shape[0] - n_in
    counted = ~(known_zero | undefined)
    offset = torch.zeros(known_zero.shape, dtype=torch.float64)
    if control is not None:
        if control.shape != known_zero.shape:
            raise AttributionInputError(
                f"control {tuple(control.shape)} must be [prompts, nodes] {tuple(known_zero.shape)}"
            )
        # Only the pairs a row actually patched (neither known zero nor absent) enter it.
        offset = torch.where(counted, control.to(torch.float64).nan_to_num(0.0), 0.0)
        y = y - inside @ offset.T  # [S, batch]
    m_pairs = max(int(counted.sum()) if union_size is None else union_size, 1)
    tail = delta / m_pairs
    batch, n = known_zero.shape
    estimate = torch.zeros(batch, n, dtype=torch.float64)
    enough = (n_in >= 2) & (n_out >= 2)
    safe_in, safe_out = n_in.clamp(min=1), n_out.clamp(min=1)
    se = torch.zeros(batch, n, dtype=torch.float64)
    dfs = torch.zeros(batch, n, dtype=torch.long)
    for b in range(batch):
        yb = y[:, b : b + 1]  # [S, 1]
        mean_in = (inside * yb).sum(0) / safe_in
        mean_out = ((1 - inside) * yb).sum(0) / safe_out
        # Centred sums of squares (not Σy² − (Σy)²/n) so constant groups give exactly 0.
        ss_in = (inside * (yb - mean_in) ** 2).sum(0)
        ss_out = ((1 - inside) * (yb - mean_out) ** 2).sum(0)
        var_in = ss_in / (n_in - 1).clamp(min=1) / safe_in  # variance of the mean
        var_out = ss_out / (n_out - 1).clamp(min=1) / safe_out
        se[b] = (var_in + var_out).sqrt()
        estimate[b] = mean_in - mean_out + offset[b]
        dfs[b] = _welch_df(var_in, var_out, n_in, n_out)
    # One t quantile per distinct df (few: capped at MAX_DF), looked up per pair.
    quantiles = torch.zeros(MAX_DF + 1, dtype=torch.float64)
    for df in torch.unique(dfs).tolist():
        quantiles[df] = t_quantile_two_sided(tail, int(df))
    bounded = enough[None, :] & counted
    upper = torch.where(bounded, estimate.abs() + quantiles[dfs] * se, math.inf)
    estimate[known_zero] = 0.0
    upper[known_zero] = 0.0
    estimate[undefined] = float("nan")
    upper[undefined] = float("nan")
    return estimate, upper, counted


def _welch_df(
    var_in: torch.Tensor, var_out: torch.Tensor, n_in: torch.Tensor, n_out: torch.Tensor
) -> torch.Tensor:
    """Welch–Satterthwaite degrees of freedom of each difference of means, rounded down.

    In 1..MAX_DF; MAX_DF where there is no spread at all (the quantile then
    multiplies a zero standard error) or a group is too small to have any.
    """
    total = var_in + var_out
    denom = var_in**2 / (n_in - 1).clamp(min=1) + var_out**2 / (n_out - 1).clamp(min=1)
    df = torch.where(denom > 0, total**2 / denom.clamp(min=torch.finfo(total.dtype).tiny), MAX_DF)
    return df.floor().clamp(1, MAX_DF).long()


@dataclass(frozen=True)
class CertificationSums:
    """Per-node sums over prompts (estimate, |estimate|, upper bound, prompts defined)."""

    estimate: Float[torch.Tensor, " n"]
    estimate_abs: Float[torch.Tensor, " n"]
    upper: Float[torch.Tensor, " n"]
    defined: Float[torch.Tensor, " n"]
    included: Float[torch.Tensor, " n"]  # subsets patching each node (same in every shard)
    rows: int

    @classmethod
    def merge(cls, parts: Iterable[CertificationSums]) -> CertificationSums:
        """Sums over shards of one prompt set (the same subsets in each)."""
        items = list(parts)
        if not items:
            raise AttributionInputError("no certification shards to merge")
        return cls(
            estimate=sum((s.estimate for s in items), torch.zeros_like(items[0].estimate)),
            estimate_abs=sum((s.estimate_abs for s in items), torch.zeros_like(items[0].upper)),
            upper=sum((s.upper for s in items), torch.zeros_like(items[0].upper)),
            defined=sum((s.defined for s in items), torch.zeros_like(items[0].defined)),
            included=items[0].included,
            rows=sum(s.rows for s in items),
        )


def certification_sums(
    delta_m: Float[torch.Tensor, "S batch"],
    subsets: Bool[torch.Tensor, "S n"],
    known_zero: Bool[torch.Tensor, "batch n"],
    undefined: Bool[torch.Tensor, "batch n"],
    delta: float,
    *,
    rows: int,
    union_size: int | None = None,
    control: torch.Tensor | None = None,  # [batch, n], checked below
) -> CertificationSums:
    """One prompt set's (or shard's) per-node sums of :func:`subset_bounds`."""
    estimate, upper, _ = subset_bounds(
        delta_m, subsets, known_zero, undefined, delta, union_size, control
    )
    defined = (~undefined).to(torch.float64)
    return CertificationSums(
        estimate=estimate.nan_to_num(0.0).sum(0),
        estimate_abs=estimate.abs().nan_to_num(0.0).sum(0),
        # inf stays inf (an unbounded prompt leaves the node unbounded); NaN pairs add 0.
        upper=torch.where(undefined, 0.0, upper).sum(0),
        defined=defined.sum(0),
        included=subsets.sum(0).to(torch.float64),
        rows=rows,
    )


def certification_result(
    nodes: Sequence[Node | str],
    sums: CertificationSums,
    *,
    samples: int,
    p: float,
    confidence: float,
    seed: int,
    mode: str,
    n_prompts: int,
    control: str | None = None,
) -> CertificationResult:
    """θ and every node's means over the prompts where it exists, highest bound first."""
    count = sums.defined.clamp(min=1)
    node_est = sums.estimate / count
    node_abs = sums.estimate_abs / count
    node_upper = sums.upper / count
    names = [str(node) for node in nodes]
    scored = [
        CertifiedNode(
            node=names[j],
            estimate=float(node_est[j]),
            estimate_abs=float(node_abs[j]),
            upper=float(node_upper[j]),
            included=int(sums.included[j]),
        )
        for j in range(len(names))
    ]
    order = sorted(range(len(names)), key=lambda j: (-float(node_upper[j]), j))
    closest = max(range(len(names)), key=lambda j: (float(node_abs[j]), -j))
    return CertificationResult(
        theta=float(node_upper.max()),
        samples=samples,
        p=p,
        confidence=confidence,
        delta=1.0 - confidence,
        seed=seed,
        mode=mode,
        n_nodes=len(names),
        n_prompts=n_prompts,
        forward_passes=samples,
        patched_rows=sums.rows,
        closest_node=names[closest],
        binding_node=names[order[0]],
        control=control,
        nodes=[scored[j] for j in order],
    )


# --- verify_top_k: auto ------------------------------------------------------------------


def auto_schedule(n_nodes: int, top_k: int, budget: int | None) -> list[int]:
    """Nodes verified after each round: top_k, 2·top_k, … up to the budget (default 5·top_k)
    and the node count. Its length R is the union bound's number of rounds."""
    if top_k < 1:
        raise AttributionInputError(f"top_k must be at least 1, got {top_k}")
    cap = min(n_nodes, 5 * top_k if budget is None else budget)
    if cap < min(top_k, n_nodes):
        raise AttributionInputError(f"the budget ({budget}) is below top_k ({top_k})")
    sizes = [*range(top_k, cap, top_k), cap]
    return sorted(set(sizes))


def smallest_top_effect(exact_abs: Sequence[float], top_k: int) -> float:
    """The K-th largest exact mean |Δm| among the verified nodes (0 with fewer than K)."""
    ranked = sorted(exact_abs, reverse=True)
    return ranked[top_k - 1] if len(ranked) >= top_k else 0.0


def auto_stop(
    theta: float | None, smallest: float, verified: int, n_nodes: int, cap: int
) -> str | None:
    """What ends the search after a round (None: verify the next round)."""
    if verified >= n_nodes:
        return "exhausted"
    if theta is not None and theta < smallest:
        return "bound"
    return "budget" if verified >= cap else None
