"""Folding many shards into the merged index at once, vectorised over every feature.

A commit only records its entry; the shards committed since the last flush
are folded in together when the index is next needed (a flush, a query). One
fold of B shards costs one pass over their summaries plus one packed-key
sort (rank_order.py) of the candidates that can still enter a top-K row and
the rows they touch, instead of B passes that each
re-sort every touched row of the index.

The result is the index the shard-by-shard merges (``FeatureIndex.merge``,
``AttributionIndex.merge``) give, whatever the batches: counts and histograms
are integer sums, activation totals are sums of per-shard totals on the
2⁻²⁰ grid and attribution totals exact sums (exact_sums.py), maxima are
maxima, and a top-K row is the K best of the union of its candidates under a
strict order (value or |value| descending, then prompt, then position),
which does not depend on how the union was cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from circuitscan.services.store.attribution_index import AttributionIndex, AttributionSummary
from circuitscan.services.store.rank_order import top_k_per_feature
from circuitscan.services.store.summaries import EMPTY, FeatureIndex, ShardSummary, on_grid


def _fold_rows(
    prompts: np.ndarray,
    positions: np.ndarray | None,
    values: np.ndarray,
    candidate: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    magnitude: bool,
) -> None:
    """Fold candidates (feature, prompt, position, value) into top-K rows (in place).

    A candidate that does not beat the K-th entry of a full row under the
    order (value or |value|, then lower prompt and position) cannot enter it,
    so it is dropped before the one sort (rank_order.py) of the rest and the
    valid entries of the rows they touch; rows no surviving candidate touches
    are not read or written.
    """
    feature, prompt, position, value = candidate
    if len(feature) == 0:
        return
    # Index arithmetic (feature * k + slot) must not wrap in a narrow stored dtype.
    feature, prompt = feature.astype(np.int64, copy=False), prompt.astype(np.int64, copy=False)
    rank = np.abs if magnitude else _same
    k = prompts.shape[1]
    # A candidate enters a full row only when it ranks above the row's K-th entry under
    # the order itself (rank, then lower prompt, then lower position): ties are settled
    # here, not by the sort. A row not yet full takes every candidate (its threshold is
    # -inf), and so does a NaN one (neither below nor equal: the sort places it).
    # (Columns first: 1-D gathers are several times faster.)
    kth_prompt = prompts[:, k - 1]
    threshold = np.where(kth_prompt == EMPTY, -np.inf, rank(values[:, k - 1]))[feature]
    score = rank(value)
    tied = score == threshold
    keep = ~((score < threshold) | tied)
    tie = np.flatnonzero(tied)
    if len(tie):
        tied_prompt, tied_kth = prompt[tie], kth_prompt[feature[tie]]
        earlier = tied_prompt < tied_kth
        if positions is not None:
            later_position = position[tie] < positions[feature[tie], k - 1]
            earlier |= (tied_prompt == tied_kth) & later_position
        keep[tie] = earlier
    if not keep.all():
        feature, prompt, position, value = feature[keep], prompt[keep], position[keep], value[keep]
    if len(feature) == 0:
        return
    best = top_k_per_feature(feature, value, prompt, position, k, magnitude=magnitude)
    feature, prompt, position = feature[best], prompt[best], position[best]
    value = value[best].astype(values.dtype)  # compared as the rows hold them
    if np.isnan(value).any() or np.isnan(rank(values[:, k - 1])).any():
        # NaN has no place in the insertion's comparisons: sort the rows with it instead.
        _sort_into_rows(prompts, positions, values, (feature, prompt, position, value), magnitude)
        return
    _insert_into_rows(prompts, positions, values, (feature, prompt, position, value), rank)


def _insert_into_rows(
    prompts: np.ndarray,
    positions: np.ndarray | None,
    values: np.ndarray,
    ranked: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    rank: Callable[[np.ndarray], np.ndarray],
) -> None:
    """Merge candidates, at most K a feature in (feature, rank) order, into their rows.

    A row is already in order, so nothing of it is sorted again: each candidate's
    place among its row's entries is found by binary search (log2 K steps over
    the candidates); the row's entries from the first place a candidate takes
    (its tail) move down by the candidates placed before them, and the rest stay
    where they are. The work is the candidates' plus the tails', never a pass
    over ``touched × k``: a first flush of a wide SAE (rows empty) writes its
    candidates and nothing else.
    """
    feature, prompt, position, value = ranked
    k = prompts.shape[1]
    flat_prompt, flat_value = _flat(prompts), _flat(values)
    flat_position = None if positions is None else _flat(positions)
    starts = np.r_[0, np.flatnonzero(feature[1:] != feature[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(feature)])
    touched = feature[starts]
    row_cell = touched * k  # a touched row's first cell
    group = np.repeat(np.arange(len(touched)), sizes)  # each candidate's touched row
    order_in_group = np.arange(len(feature)) - np.repeat(starts, sizes)
    # A row's entries fill its first slots: its length is where the first EMPTY is.
    filled = _search(
        np.zeros(len(touched), dtype=np.int64),
        np.full(len(touched), k, dtype=np.int64),
        lambda mid: flat_prompt[row_cell + mid] != EMPTY,
    )
    score = rank(value)
    cell_of = row_cell[group]

    def above(mid: np.ndarray) -> np.ndarray:
        """Whether the row entry at ``mid`` ranks above each candidate."""
        cell = cell_of + mid
        other_score, other_prompt = rank(flat_value[cell]), flat_prompt[cell]
        result = (other_score > score) | ((other_score == score) & (other_prompt < prompt))
        if flat_position is not None:
            same = (other_score == score) & (other_prompt == prompt)
            result |= same & (flat_position[cell] < position)
        return result

    place = _search(np.zeros(len(feature), dtype=np.int64), filled[group].astype(np.int64), above)
    # A row's tail starts at its best candidate's place; entries before it stay put.
    tail = place[starts]
    kept_old = filled - tail
    span = kept_old + sizes  # the tail's entries and the candidates, merged
    base = np.r_[0, np.cumsum(span)[:-1]]
    new_at = base[group] + place - tail[group] + order_in_group
    taken = np.zeros(int(span.sum()), dtype=bool)
    taken[new_at] = True
    old_at = np.flatnonzero(~taken)  # the tails' entries, in (row, slot) order
    old_row = np.repeat(np.arange(len(touched)), kept_old)
    old_start = np.r_[0, np.cumsum(kept_old)[:-1]]
    old_slot = tail[old_row] + np.arange(len(old_row)) - np.repeat(old_start, kept_old)
    old_final = tail[old_row] + old_at - base[old_row]
    moves = old_final < k
    source = row_cell[old_row[moves]] + old_slot[moves]
    target = row_cell[old_row[moves]] + old_final[moves]
    new_final = place + order_in_group
    enters = new_final < k
    new_cell = cell_of[enters] + new_final[enters]
    fields = [(flat_prompt, prompt), (flat_value, value)]
    if flat_position is not None:
        fields.append((flat_position, position))
    for flat, new in fields:
        moving = flat[source]  # read before any write: a source may be another's target
        flat[target] = moving
        flat[new_cell] = new[enters].astype(flat.dtype)


def _search(
    lo: np.ndarray, hi: np.ndarray, above: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Vectorised binary search: per item, the first index in [lo, hi) where ``above``
    (true on a prefix) is false, or ``hi``."""
    while True:
        open_ = lo < hi
        if not open_.any():
            return lo
        mid = np.where(open_, (lo + hi) // 2, 0)
        up = above(mid)
        lo = np.where(open_ & up, mid + 1, lo)
        hi = np.where(open_ & ~up, mid, hi)


def _sort_into_rows(
    prompts: np.ndarray,
    positions: np.ndarray | None,
    values: np.ndarray,
    ranked: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    magnitude: bool,
) -> None:
    """Fold candidates into their rows by one sort of them with the rows' entries."""
    feature, prompt, position, value = ranked
    k = prompts.shape[1]
    touched = np.unique(feature)
    old_prompt = prompts[touched]
    valid = old_prompt != EMPTY
    if valid.any():
        old_position = positions[touched] if positions is not None else np.zeros_like(old_prompt)
        rows = np.repeat(touched, k).reshape(len(touched), k)
        feature = np.concatenate([rows[valid], feature])
        prompt = np.concatenate([old_prompt[valid], prompt.astype(prompts.dtype)])
        position = np.concatenate([old_position[valid], position.astype(old_position.dtype)])
        value = np.concatenate([values[touched][valid], value.astype(values.dtype)])
    best = top_k_per_feature(feature, value, prompt, position, k, magnitude=magnitude)
    feature = feature[best]
    starts = np.searchsorted(feature, touched)
    slot = np.arange(len(feature)) - np.repeat(starts, np.diff(np.r_[starts, len(feature)]))
    # A row's entries fill its first slots, and a touched row keeps at least the entries
    # it had (the K best of a superset), so writing the new ones leaves no stale slot:
    # no row is cleared first. (Flat indices: several times faster than 2-D ones.)
    cells = feature * k + slot
    _flat(prompts)[cells] = prompt[best]
    _flat(values)[cells] = value[best]
    if positions is not None:
        _flat(positions)[cells] = position[best]


def _flat(array: np.ndarray) -> np.ndarray:
    """A 1-D view of ``array`` (a reshape of a non-contiguous one would be a copy)."""
    if not array.flags.c_contiguous:
        raise ValueError("index arrays are folded in place and must be C-contiguous")
    return array.reshape(-1)


def fold_summaries(index: FeatureIndex, shards: Sequence[ShardSummary]) -> None:
    """Fold shards' summaries and top candidates into ``index`` (in place)."""
    if not shards:
        return
    fired = np.concatenate([s.features for s in shards]).astype(np.int64, copy=False)
    d_sae = index.count.shape[0]
    touched = np.flatnonzero(np.bincount(fired, minlength=d_sae))  # sorted, like np.unique
    had = index.count[touched] > 0
    counts = np.concatenate([s.count for s in shards]).astype(np.float64)  # exact below 2**53
    index.count += np.bincount(fired, weights=counts, minlength=d_sae).astype(np.int64)
    # Grid multiples add exactly: the same bytes as one shard at a time, in any order.
    totals = np.concatenate([on_grid(s.total) for s in shards])
    index.total += np.bincount(fired, weights=totals, minlength=d_sae)
    peak = np.full(index.max.shape, -np.inf, dtype=np.float32)
    for shard in shards:  # distinct features within a shard: no ufunc.at needed
        rows = shard.features.astype(np.int64)
        peak[rows] = np.maximum(peak[rows], shard.max.astype(np.float32))
    index.max[touched] = np.where(had, np.maximum(index.max[touched], peak[touched]), peak[touched])
    hist = _flat(index.hist)
    for shard in shards:  # nonzero (feature, bin) cells only, distinct within a shard
        entries = shard.hist_entries()
        if entries is not None:
            hist[entries[0]] += entries[1]
    candidate = (
        np.concatenate([s.top_feature for s in shards]).astype(np.int64, copy=False),
        np.concatenate([s.top_prompt for s in shards]).astype(np.int64, copy=False),
        np.concatenate([s.top_position for s in shards]).astype(np.int32),
        np.concatenate([s.top_value for s in shards]).astype(np.float32),
    )
    _fold_rows(index.top_prompt, index.top_position, index.top_value, candidate, magnitude=False)


def _same(values: np.ndarray) -> np.ndarray:
    return values


def fold_attributions(index: AttributionIndex, shards: Sequence[AttributionSummary]) -> None:
    """Fold shards' attribution summaries into one site's attribution index (in place).

    Totals add each shard's own sums exactly; top rows take the K best of the union of
    the shards' candidates.
    """
    if not shards:
        return
    # Added exactly (exact_sums.py): the same bytes whatever the shards and batches.
    fired = np.concatenate([s.features for s in shards])
    index.add_totals("total", fired, np.concatenate([s.total for s in shards]))
    index.add_totals("total_abs", fired, np.concatenate([s.total_abs for s in shards]))
    if index.atp_total is not None:
        for shard in shards:
            if shard.atp_features is None:
                raise ValueError("a paired store's attribution index needs each shard's AtP sums")
        atp_features = np.concatenate([s.atp_features for s in shards])  # type: ignore[misc]
        for name in ("atp_total", "atp_total_abs"):
            parts = [getattr(s, name) for s in shards]
            index.add_totals(name, atp_features, np.concatenate(parts))
        errors = np.concatenate([s.error_atp for s in shards])  # type: ignore[misc]
        index.add_totals("error_atp", np.tile([0, 1], len(shards)), errors)
    _fold_rows(
        index.top_prompt,
        index.top_position,
        index.top_value,
        (
            np.concatenate([s.top_feature for s in shards]),
            np.concatenate([s.top_prompt for s in shards]),
            np.concatenate([s.top_position for s in shards]),
            np.concatenate([s.top_value for s in shards]),
        ),
        magnitude=True,
    )
    feature = np.concatenate([s.prompt_feature for s in shards])
    _fold_rows(
        index.prompt_prompt,
        None,
        index.prompt_value,
        (
            feature,
            np.concatenate([s.prompt_prompt for s in shards]),
            np.zeros(len(feature), dtype=np.int64),
            np.concatenate([s.prompt_value for s in shards]),
        ),
        magnitude=True,
    )
