"""Top-K per feature under the index's strict order, with one integer sort.

Every top-K row of the index (activations, |a·g| entries, |Σ a·g| prompts)
keeps, per feature, the entries of largest value (or |value|), ties broken
by lower prompt, then lower position. A four-key ``np.lexsort`` gives that
order but costs four stable sorts; folding a few hundred thousand candidates
at a flush spent most of its time there. Here one unstable sort of a packed
uint64 key (feature, value rounded to float32 and made descending) orders
all but the entries whose rounded values tie, and only those runs are then
put in the exact order (exact value, prompt, position): by one more packed
sort when their exact values are equal within each run (copies, zero
values), by a lexsort of just those entries otherwise. Rounding to float32
is monotone, so the coarse order never contradicts the exact one.

The result is the same indices, in the same order, as the lexsort it
replaces (tests/unit/test_rank_order.py); NaN values, negative or very
large feature ids fall back to that lexsort.
"""

from __future__ import annotations

import numpy as np


def descending_key(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the float32 values' descending order."""
    # + 0 turns -0.0 into 0.0, which compare equal and must tie.
    bits = np.ascontiguousarray(values + np.float32(0), dtype=np.float32).view(np.uint32)
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))
    return ~ascending


def _lexsorted(
    feature: np.ndarray, score: np.ndarray, prompt: np.ndarray, position: np.ndarray
) -> np.ndarray:
    return np.lexsort((position, prompt, -score.astype(np.float64), feature))


def _bits(values: np.ndarray) -> int:
    return int(values.max(initial=0)).bit_length()


def ranked_order(
    feature: np.ndarray,
    value: np.ndarray,
    prompt: np.ndarray,
    position: np.ndarray,
    *,
    magnitude: bool = False,
) -> np.ndarray:
    """Indices sorting the entries by (feature, value or |value| descending, prompt, position)."""
    feature = np.asarray(feature)
    score = np.abs(value) if magnitude else np.asarray(value)
    if len(feature) == 0:
        return np.zeros(0, dtype=np.int64)
    if (
        score.dtype.kind != "f"
        or np.isnan(score).any()
        or int(feature.min()) < 0
        or int(feature.max()) >= 1 << 32
    ):
        return _lexsorted(feature, score, prompt, position)
    with np.errstate(over="ignore"):  # beyond float32: ±inf, still in order
        coarse = descending_key(score.astype(np.float32))
    primary = (feature.astype(np.uint64) << np.uint64(32)) | coarse.astype(np.uint64)
    order = np.argsort(primary)
    ranked = primary[order]
    tied = ranked[1:] == ranked[:-1]
    if not tied.any():
        return order
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= tied
    in_run[:-1] |= tied
    slots = np.flatnonzero(in_run)  # positions in ``order`` held by runs of equal keys
    run = np.cumsum(~tied)[slots - (slots > 0)]  # a run's id, non-decreasing along ``slots``
    members = order[slots]
    exact = score[members].astype(np.float64)
    same_run = run[1:] == run[:-1]
    p = prompt[members].astype(np.int64, copy=False)
    q = position[members].astype(np.int64, copy=False)
    p, q = p - p.min(), q - q.min()
    width_p, width_q = _bits(p), _bits(q)
    if np.all(exact[1:][same_run] == exact[:-1][same_run]) and (
        _bits(run) + width_p + width_q <= 64
    ):
        key = (run.astype(np.uint64) << np.uint64(width_p + width_q)) | (
            (p.astype(np.uint64) << np.uint64(width_q)) | q.astype(np.uint64)
        )
        within = np.argsort(key)
    else:
        within = np.lexsort((q, p, -exact, run))
    order[slots] = members[within]
    return order


def top_k_per_feature(
    feature: np.ndarray,
    value: np.ndarray,
    prompt: np.ndarray,
    position: np.ndarray,
    k: int,
    *,
    magnitude: bool = False,
) -> np.ndarray:
    """Indices of the k best entries per feature, in (feature, rank) order."""
    order = ranked_order(feature, value, prompt, position, magnitude=magnitude)
    sorted_feature = np.asarray(feature)[order]
    starts = np.r_[0, np.flatnonzero(sorted_feature[1:] != sorted_feature[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.arange(len(order)) - group_start
    return order[rank < k]
