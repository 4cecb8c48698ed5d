"""Per-feature summaries and top-K example candidates: per shard, and merged.

A worker computes its shard's summaries and per-feature top-K candidates
from the data it writes; the driver merges shard candidates into the store's
index at commit. Nothing here scans the store. Ties are broken by (prompt,
position) so the merged index does not depend on commit order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from circuitscan.services.store.encoding import exact_values, values_back
from circuitscan.services.store.rank_order import descending_key, top_k_per_feature

EMPTY = -1

# Merged totals are sums of per-shard float64 totals. Float addition depends
# on its order, and shards commit in any order; each shard's total is first
# rounded to a multiple of TOTAL_GRID, and sums of such multiples are exact
# (so independent of the order) while they stay below TOTAL_EXACT_BELOW in
# magnitude. The rounding moves a shard's total by at most TOTAL_GRID / 2.
TOTAL_GRID = 2.0**-20
TOTAL_EXACT_BELOW = 2.0**33


def on_grid(values: np.ndarray) -> np.ndarray:
    """``values`` (float64) rounded to multiples of TOTAL_GRID, exactly (a power of two)."""
    return np.round(np.asarray(values, dtype=np.float64) / TOTAL_GRID) * TOTAL_GRID


# Activation histogram bins, fixed for every store so that shards' histograms add:
# half-octave bins of |value| from 2**-8 to 2**8 (bin b holds [2**((b-16)/2),
# 2**((b-15)/2))); smaller values fall in bin 0, larger ones in the last bin.
HIST_BINS = 32
_HIST_LOW_EXPONENT = -8.0
_HIST_PER_OCTAVE = 2


def histogram_bin(values: np.ndarray) -> np.ndarray:
    """The histogram bin (0..HIST_BINS-1) of each activation value."""
    magnitude = np.maximum(np.abs(values.astype(np.float64)), np.finfo(np.float64).tiny)
    raw = np.floor((np.log2(magnitude) - _HIST_LOW_EXPONENT) * _HIST_PER_OCTAVE)
    return np.clip(raw, 0, HIST_BINS - 1).astype(np.int64)


def histogram_edges() -> np.ndarray:
    """float64 [HIST_BINS + 1] bin edges (the outer bins also hold what lies beyond them)."""
    return 2.0 ** (_HIST_LOW_EXPONENT + np.arange(HIST_BINS + 1) / _HIST_PER_OCTAVE)


@dataclass
class ShardSummary:
    """Summaries of one site over one shard (sparse: only features that fired)."""

    features: np.ndarray  # uint32 [fired]
    count: np.ndarray  # uint32 [fired]
    total: np.ndarray  # float64 [fired]
    max: np.ndarray  # float32 [fired]
    top_feature: np.ndarray  # uint32 [candidates], sorted by feature then rank
    top_prompt: np.ndarray  # uint32 [candidates], global prompt index
    top_position: np.ndarray  # uint32 [candidates]
    top_value: np.ndarray  # float32 [candidates]
    # uint32 [fired, HIST_BINS] activation counts per bin, as shards before sparse
    # histograms stored them; None for shards written before stores kept histograms
    # (they are left out of the merged histogram).
    hist: np.ndarray | None = None
    # Sparse histogram (what workers write now): the nonzero cells, as
    # row * HIST_BINS + bin with row indexing ``features``, and their counts. A
    # shard of a wide SAE fires each feature a few times, so the dense rows are
    # mostly zeros (30k features x 32 bins for ~35k activations at 131,072 features).
    hist_cell: np.ndarray | None = None  # int64 [cells]
    hist_count: np.ndarray | None = None  # uint32 [cells]

    def hist_entries(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(feature * HIST_BINS + bin, count) of each nonzero histogram cell; None when
        the shard kept no histogram."""
        if self.hist_cell is not None and self.hist_count is not None:
            local, counts = self.hist_cell.astype(np.int64), self.hist_count
        elif self.hist is not None:
            flat = self.hist.reshape(-1)
            local = np.flatnonzero(flat)
            counts = flat[local]
        else:
            return None
        rows = self.features.astype(np.int64)[local // HIST_BINS]
        return rows * HIST_BINS + local % HIST_BINS, counts


def _top_per_group(
    feature: np.ndarray, value: np.ndarray, prompt: np.ndarray, position: np.ndarray, k: int
) -> np.ndarray:
    """Indices of the k largest values per feature (ties: lower prompt, then position)."""
    return top_k_per_feature(feature, value, prompt, position, k)


def _top_per_feature_in_token_order(feature: np.ndarray, value: np.ndarray, k: int) -> np.ndarray:
    """``_top_per_group`` for entries already in (prompt, position) order, as a shard's are.

    One stable sort of a packed (feature, descending value) key replaces the
    four-key lexsort: ties keep entry order, which is (prompt, position).
    """
    key = (feature.astype(np.uint64) << np.uint64(32)) | descending_key(value).astype(np.uint64)
    order = np.argsort(key, kind="stable")
    sorted_feature = feature[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_feature)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.arange(len(order)) - group_start
    return order[rank < k]


def summarize_shard(
    feature_ids: np.ndarray,
    values: np.ndarray,
    token_prompt: np.ndarray,
    token_position: np.ndarray,
    token_index: np.ndarray,
    k: int,
) -> ShardSummary:
    """Summaries of a site's entries; ``token_*`` map each entry's token to (prompt, position)."""
    values = values.astype(np.float32)
    features, inverse, count = np.unique(feature_ids, return_inverse=True, return_counts=True)
    total = np.zeros(len(features), dtype=np.float64)
    np.add.at(total, inverse, values.astype(np.float64))
    peak = np.full(len(features), -np.inf, dtype=np.float32)
    np.maximum.at(peak, inverse, values)
    prompt = token_prompt[token_index]
    position = token_position[token_index]
    keep = _top_per_feature_in_token_order(feature_ids, values, k)
    cells = inverse.astype(np.int64) * HIST_BINS + histogram_bin(values)
    hist_cell, hist_count = np.unique(cells, return_counts=True)
    return ShardSummary(
        features=features.astype(np.uint32),
        count=count.astype(np.uint32),
        total=total,
        max=peak,
        top_feature=feature_ids[keep].astype(np.uint32),
        top_prompt=prompt[keep].astype(np.uint32),
        top_position=position[keep].astype(np.uint32),
        top_value=values[keep],
        hist_cell=hist_cell,
        hist_count=hist_count.astype(np.uint32),
    )


@dataclass
class FeatureIndex:
    """Dense per-feature summaries and top-K examples of one site (empty slots: prompt −1)."""

    count: np.ndarray  # int64 [d_sae]
    total: np.ndarray  # float64 [d_sae]
    max: np.ndarray  # float32 [d_sae]
    top_prompt: np.ndarray  # int64 [d_sae, k]
    top_position: np.ndarray  # int32 [d_sae, k]
    top_value: np.ndarray  # float32 [d_sae, k]
    # int64 [d_sae, HIST_BINS]: activations per histogram bin (see histogram_bin); a
    # row sums to less than ``count`` when some shards predate histograms.
    hist: np.ndarray

    @classmethod
    def empty(cls, d_sae: int, k: int) -> FeatureIndex:
        return cls(
            count=np.zeros(d_sae, dtype=np.int64),
            total=np.zeros(d_sae, dtype=np.float64),
            max=np.zeros(d_sae, dtype=np.float32),
            top_prompt=np.full((d_sae, k), EMPTY, dtype=np.int64),
            top_position=np.zeros((d_sae, k), dtype=np.int32),
            top_value=np.zeros((d_sae, k), dtype=np.float32),
            hist=np.zeros((d_sae, HIST_BINS), dtype=np.int64),
        )

    def to_disk(self, name: str) -> np.ndarray:
        """Field ``name`` in the narrowest dtype that holds it (empty slots: all ones)."""
        data = getattr(self, name)
        if data.dtype.kind in "iu":
            widest = int(data.max()) if data.size else 0
            narrow = np.uint16 if widest < (1 << 16) - 1 else np.uint32
            if widest >= (1 << 32) - 1:
                return data
            return np.where(data == EMPTY, np.iinfo(narrow).max, data).astype(narrow)
        if data.dtype == np.float32:  # max and top values: stored 16-bit values, exact
            return exact_values(data)
        return data

    def from_disk(self, name: str, stored: np.ndarray) -> np.ndarray:
        """Inverse of ``to_disk`` (indices and counts back to this index's dtypes)."""
        dtype = getattr(self, name).dtype
        if dtype.kind == "f":
            return values_back(stored).astype(dtype)
        if stored.dtype.kind == "u" and dtype.kind == "i":
            empty = stored == np.iinfo(stored.dtype).max
            return np.where(empty, EMPTY, stored.astype(dtype)).astype(dtype)
        return stored.astype(dtype)

    def copy(self) -> FeatureIndex:
        return FeatureIndex(
            **{name: getattr(self, name).copy() for name in self.__dataclass_fields__}
        )

    def merge(self, shard: ShardSummary) -> None:
        """Fold one shard's summaries and candidates in (in place)."""
        fired = shard.features.astype(np.int64)
        had = self.count[fired] > 0
        self.count[fired] += shard.count
        self.total[fired] += on_grid(shard.total)  # exact: the same bytes in any commit order
        self.max[fired] = np.where(had, np.maximum(self.max[fired], shard.max), shard.max)
        cells = shard.hist_entries()
        if cells is not None:
            np.add.at(self.hist.reshape(-1), cells[0], cells[1].astype(np.int64))
        touched = np.unique(shard.top_feature.astype(np.int64))
        if len(touched) == 0:
            return
        k = self.top_prompt.shape[1]
        old_prompt = self.top_prompt[touched]
        valid = old_prompt != EMPTY
        rows = np.repeat(touched, k).reshape(len(touched), k)
        feature = np.concatenate([rows[valid], shard.top_feature.astype(np.int64)])
        prompt = np.concatenate([old_prompt[valid], shard.top_prompt.astype(np.int64)])
        position = np.concatenate(
            [self.top_position[touched][valid], shard.top_position.astype(np.int32)]
        )
        value = np.concatenate([self.top_value[touched][valid], shard.top_value])
        keep = _top_per_group(feature, value, prompt, position, k)
        feature, prompt, position, value = feature[keep], prompt[keep], position[keep], value[keep]
        starts = np.searchsorted(feature, touched)
        slot = np.arange(len(feature)) - np.repeat(starts, np.diff(np.r_[starts, len(feature)]))
        self.top_prompt[touched] = EMPTY
        self.top_position[touched] = 0
        self.top_value[touched] = 0
        self.top_prompt[feature, slot] = prompt
        self.top_position[feature, slot] = position
        self.top_value[feature, slot] = value
