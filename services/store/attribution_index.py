"""Corpus-wide attribution rankings kept in the merged index: per feature Σ a·g, Σ |a·g|, top hits.

For every stored entry (token, feature) of a store with gradients, the term
``a·∂m/∂a`` (metric units; minus the linear estimate of zero-ablating that
feature at that token) is summed per feature, signed and in absolute value,
and the entries and prompts where it is largest in magnitude are kept
(``top_*``: (prompt, position, term); ``prompt_*``: (prompt, Σ over the
prompt's positions)). Each shard's worker sums its terms into an AttributionSummary (per fired
feature Σ and Σ |·|, its own top-K entries and prompts), stored in the
shard's index summary (shard_summary.py), which the index folds in; the
arrays are persisted in the merged index's row chunks (index_chunks.py). An
index without them (written by an older circuitscan) leaves the store
without rankings until its index is rebuilt.

Sums are over the values as stored (16-bit activations and gradients
widened to float32, multiplied in float64): each shard's sums in entry order
(float64), added to the index's totals exactly (exact_sums.py: each total is
a float64 value, the exact sum rounded, and its exact residual), so a total
is the same bytes whatever the order shards are folded in, and equals the
exact sum of the shards' sums to within 2⁻⁶¹ a shard.

A paired cache (docs/paired_caches.md) also keeps per feature Σ and Σ |·| of
the AtP term ``(a' − a)·∂m/∂a`` of every clean token (the corrupted and clean
entries joined per (token, feature); a feature on one side only counts there
with 0 on the other), and Σ, Σ |·| of the error node's stored term
``error_atp`` (``atp_*``, ``error_atp``), summed exactly in the same way. A
paired store whose index generation lacks them counts as an index without
rankings (rebuilt by repair).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.abc.store import Store

from circuitscan.schemas.errors import NotFoundError
from circuitscan.services.store.encoding import INDEX_ROW_CHUNK, ArrayWrite, read_arrays
from circuitscan.services.store.errors import StoreError
from circuitscan.services.store.exact_sums import add_exact
from circuitscan.services.store.paired_io import PairedSite
from circuitscan.services.store.rank_order import top_k_per_feature
from circuitscan.services.store.shard_io import PromptShard, SiteShard

EMPTY = -1
ATTRIBUTION_DIR = "attribution"
ARRAYS = (
    "total",
    "total_abs",
    "top_prompt",
    "top_position",
    "top_value",
    "prompt_prompt",
    "prompt_value",
)
PAIRED_ARRAYS = ("atp_total", "atp_total_abs", "error_atp")
# Each total's exact remainder (exact_sums.py): the total is value + residual, exactly.
RESIDUALS = {"total": "total_residual", "total_abs": "total_abs_residual"}
PAIRED_RESIDUALS = {
    "atp_total": "atp_total_residual",
    "atp_total_abs": "atp_total_abs_residual",
    "error_atp": "error_atp_residual",
}
ALL_RESIDUALS = {**RESIDUALS, **PAIRED_RESIDUALS}


class NoAttributionIndexError(StoreError, NotFoundError):
    """A store whose index holds no attribution sums (no gradients, or an older index)."""


@dataclass
class ShardAttribution:
    """One shard's attribution terms of one site, per entry, with where each entry sits."""

    feature: np.ndarray  # int64 [entries]
    prompt: np.ndarray  # int64 [entries], global prompt index
    position: np.ndarray  # int64 [entries]
    value: np.ndarray  # float64 [entries], a·g
    atp: ShardAtP | None = None  # paired caches only


@dataclass
class ShardAtP:
    """One shard's AtP sums of one site of a paired cache."""

    total: np.ndarray  # float64 [d_sae]: Σ over tokens of (a' − a)·g
    total_abs: np.ndarray  # float64 [d_sae]: Σ over tokens of |(a' − a)·g|
    error_atp: np.ndarray  # float64 [2]: Σ, Σ |·| of the error node's term over tokens


def shard_atp(site: SiteShard, paired: PairedSite, d_sae: int) -> ShardAtP:
    """Per feature, the AtP term of every clean token summed over the shard (and |·|).

    The term of (token t, feature i) is ``a'_i·g'_i − a_i·g_i`` over t's
    corrupted and clean entries (``g'``: the gradient at the clean prompt of
    the corrupted entries' features), as store-fed attribution sums it.
    """
    assert site.gradients is not None
    n_tokens = len(site.token_offsets) - 1
    keys, values = [], []
    for offsets, ids, a, g, sign in (
        (site.token_offsets, site.feature_ids, site.activations, site.gradients, -1.0),
        (paired.token_offsets, paired.feature_ids, paired.activations, paired.gradients, 1.0),
    ):
        token = np.repeat(np.arange(n_tokens, dtype=np.int64), np.diff(offsets).astype(np.int64))
        keys.append(token * d_sae + ids.astype(np.int64))
        values.append(sign * a.astype(np.float64) * g.astype(np.float64))
    key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    per_pair = np.bincount(inverse, weights=np.concatenate(values), minlength=key.size)
    feature = key % d_sae
    error = paired.error_atp.astype(np.float64)
    return ShardAtP(
        total=np.bincount(feature, weights=per_pair, minlength=d_sae),
        total_abs=np.bincount(feature, weights=np.abs(per_pair), minlength=d_sae),
        error_atp=np.array([error.sum(), np.abs(error).sum()]),
    )


def shard_attribution(
    site: SiteShard,
    prompts: PromptShard,
    prompt_start: int,
    paired: PairedSite | None = None,
    d_sae: int = 0,
) -> ShardAttribution:
    """The a·g term of every stored entry of one site of one shard (and, with the site's
    corrupted side, its AtP sums)."""
    if site.gradients is None:
        raise NoAttributionIndexError("this store keeps no gradients: there is no a·g to rank")
    lengths = np.diff(prompts.prompt_offsets).astype(np.int64)
    n_tokens = int(lengths.sum())
    token_prompt = prompt_start + np.repeat(np.arange(len(lengths)), lengths)
    token_position = np.arange(n_tokens) - np.repeat(prompts.prompt_offsets[:-1], lengths)
    per_token = np.diff(site.token_offsets).astype(np.int64)
    entry_token = np.repeat(np.arange(n_tokens), per_token)
    return ShardAttribution(
        feature=site.feature_ids.astype(np.int64),
        prompt=token_prompt[entry_token],
        position=token_position[entry_token],
        value=site.activations.astype(np.float64) * site.gradients.astype(np.float64),
        atp=None if paired is None else shard_atp(site, paired, d_sae),
    )


@dataclass
class AttributionSummary:
    """What the merged index needs of one shard's attribution terms at one site (compact).

    Per fired feature Σ a·g and Σ |a·g| (each summed over the shard in entry
    order), the shard's own K entries and K prompts of largest |term| per
    feature (the only ones that can enter the merged top-K rows: any other has
    K better in its own shard), and a paired cache's AtP sums, sparse.
    Computed by the worker that writes the shard (shard_summary.py), or from
    the shard's arrays for shards written before that: the same function
    either way, so both fold to the same index.
    """

    features: np.ndarray  # int64 [fired], ascending
    total: np.ndarray  # float64 [fired]
    total_abs: np.ndarray  # float64 [fired]
    top_feature: np.ndarray  # int64 [candidates], by feature then rank
    top_prompt: np.ndarray  # int64 [candidates], global prompt index
    top_position: np.ndarray  # int64 [candidates]
    top_value: np.ndarray  # float64 [candidates]
    prompt_feature: np.ndarray  # int64 [pairs]
    prompt_prompt: np.ndarray  # int64 [pairs]
    prompt_value: np.ndarray  # float64 [pairs]: Σ over the prompt's positions
    atp_features: np.ndarray | None = None  # paired caches: features with a nonzero AtP sum
    atp_total: np.ndarray | None = None
    atp_total_abs: np.ndarray | None = None
    error_atp: np.ndarray | None = None  # float64 [2]


def summarize_attribution(shard: ShardAttribution, k: int) -> AttributionSummary:
    """The compact summary of one shard's terms (see AttributionSummary)."""
    features, inverse = np.unique(shard.feature, return_inverse=True)
    total = np.bincount(inverse, weights=shard.value, minlength=len(features))
    total_abs = np.bincount(inverse, weights=np.abs(shard.value), minlength=len(features))
    top = _top_by_magnitude(shard.feature, shard.value, shard.prompt, shard.position, k)
    # A prompt lies in one shard, so its per-prompt sums are complete here (summed in
    # entry order).
    key = shard.feature * (int(shard.prompt.max(initial=0)) + 1) + shard.prompt
    unique, pair = np.unique(key, return_inverse=True)
    sums = np.bincount(pair, weights=shard.value, minlength=len(unique))
    first = np.zeros(len(unique), dtype=np.int64)
    first[pair[::-1]] = np.arange(len(pair))[::-1]
    pair_feature, pair_prompt = shard.feature[first], shard.prompt[first]
    best = _top_by_magnitude(pair_feature, sums, pair_prompt, np.zeros_like(pair_prompt), k)
    out = AttributionSummary(
        features=features.astype(np.int64),
        total=total,
        total_abs=total_abs,
        top_feature=shard.feature[top].astype(np.int64),
        top_prompt=shard.prompt[top].astype(np.int64),
        top_position=shard.position[top].astype(np.int64),
        top_value=shard.value[top].astype(np.float64),
        prompt_feature=pair_feature[best].astype(np.int64),
        prompt_prompt=pair_prompt[best].astype(np.int64),
        prompt_value=sums[best],
    )
    if shard.atp is not None:
        nonzero = np.flatnonzero((shard.atp.total != 0) | (shard.atp.total_abs != 0))
        out.atp_features = nonzero.astype(np.int64)
        out.atp_total = shard.atp.total[nonzero]
        out.atp_total_abs = shard.atp.total_abs[nonzero]
        out.error_atp = shard.atp.error_atp.astype(np.float64)
    return out


def _top_by_magnitude(
    feature: np.ndarray, value: np.ndarray, prompt: np.ndarray, position: np.ndarray, k: int
) -> np.ndarray:
    """Indices of the k entries of largest |value| per feature (ties: lower prompt, position)."""
    return top_k_per_feature(feature, value, prompt, position, k, magnitude=True)


@dataclass
class AttributionIndex:
    """Dense per-feature attribution sums and top hits of one site (empty slots: prompt −1)."""

    total: np.ndarray  # float64 [d_sae]: Σ a·g
    total_abs: np.ndarray  # float64 [d_sae]: Σ |a·g|
    top_prompt: np.ndarray  # int64 [d_sae, k]: entries of largest |a·g|
    top_position: np.ndarray  # int64 [d_sae, k]
    top_value: np.ndarray  # float64 [d_sae, k]
    prompt_prompt: np.ndarray  # int64 [d_sae, k]: prompts of largest |Σ_positions a·g|
    prompt_value: np.ndarray  # float64 [d_sae, k]
    # Paired caches only (None otherwise): per feature Σ, Σ |·| of the AtP term, and the
    # error node's Σ, Σ |·| ([2]).
    atp_total: np.ndarray | None = None
    atp_total_abs: np.ndarray | None = None
    error_atp: np.ndarray | None = None
    # Each total's exact remainder (RESIDUALS, PAIRED_RESIDUALS; zeros when not given:
    # an index written before they were kept).
    total_residual: np.ndarray | None = None
    total_abs_residual: np.ndarray | None = None
    atp_total_residual: np.ndarray | None = None
    atp_total_abs_residual: np.ndarray | None = None
    error_atp_residual: np.ndarray | None = None

    def __post_init__(self) -> None:
        for total, residual in ALL_RESIDUALS.items():
            values = getattr(self, total)
            if values is not None and getattr(self, residual) is None:
                setattr(self, residual, np.zeros(values.shape, dtype=np.float64))

    def add_totals(self, name: str, rows: np.ndarray, contributions: np.ndarray) -> None:
        """Add ``contributions`` to total ``name`` of ``rows`` exactly (exact_sums.py)."""
        add_exact(getattr(self, name), getattr(self, ALL_RESIDUALS[name]), rows, contributions)

    @classmethod
    def empty(cls, d_sae: int, k: int, *, paired: bool = False) -> AttributionIndex:
        return cls(
            total=np.zeros(d_sae),
            total_abs=np.zeros(d_sae),
            top_prompt=np.full((d_sae, k), EMPTY, dtype=np.int64),
            top_position=np.zeros((d_sae, k), dtype=np.int64),
            top_value=np.zeros((d_sae, k)),
            prompt_prompt=np.full((d_sae, k), EMPTY, dtype=np.int64),
            prompt_value=np.zeros((d_sae, k)),
            atp_total=np.zeros(d_sae) if paired else None,
            atp_total_abs=np.zeros(d_sae) if paired else None,
            error_atp=np.zeros(2) if paired else None,
        )

    def merge(self, shard: ShardAttribution) -> None:
        """Fold one shard in (in place); the result does not depend on the order of shards."""
        d_sae = self.total.shape[0]
        # Each shard's sums in entry order, added exactly: the same bytes in any order.
        every = np.arange(d_sae)
        self.add_totals(
            "total", every, np.bincount(shard.feature, weights=shard.value, minlength=d_sae)
        )
        magnitude = np.bincount(shard.feature, weights=np.abs(shard.value), minlength=d_sae)
        self.add_totals("total_abs", every, magnitude)
        if self.atp_total is not None:
            if shard.atp is None:
                raise ValueError("a paired store's attribution index needs each shard's AtP sums")
            self.add_totals("atp_total", every, shard.atp.total)
            self.add_totals("atp_total_abs", every, shard.atp.total_abs)
            self.add_totals("error_atp", np.arange(2), shard.atp.error_atp)
        self._fold(
            "top", shard.feature, shard.prompt, shard.position, shard.value, with_position=True
        )
        # A prompt lies in one shard, so its per-prompt sums are complete here.
        key = shard.feature * (int(shard.prompt.max(initial=0)) + 1) + shard.prompt
        unique, inverse = np.unique(key, return_inverse=True)
        sums = np.bincount(inverse, weights=shard.value, minlength=len(unique))
        first = np.zeros(len(unique), dtype=np.int64)
        first[inverse[::-1]] = np.arange(len(inverse))[::-1]
        self._fold(
            "prompt",
            shard.feature[first],
            shard.prompt[first],
            np.zeros(len(unique), dtype=np.int64),
            sums,
            with_position=False,
        )

    def _fold(
        self,
        name: str,
        feature: np.ndarray,
        prompt: np.ndarray,
        position: np.ndarray,
        value: np.ndarray,
        *,
        with_position: bool,
    ) -> None:
        touched = np.unique(feature)
        if len(touched) == 0:
            return
        old_prompt = getattr(self, f"{name}_prompt")[touched]
        old_value = getattr(self, f"{name}_value")[touched]
        k = old_prompt.shape[1]
        old_position = self.top_position[touched] if with_position else np.zeros_like(old_prompt)
        valid = old_prompt != EMPTY
        rows = np.repeat(touched, k).reshape(len(touched), k)
        feature = np.concatenate([rows[valid], feature])
        prompt = np.concatenate([old_prompt[valid], prompt])
        position = np.concatenate([old_position[valid], position])
        value = np.concatenate([old_value[valid], value])
        keep = _top_by_magnitude(feature, value, prompt, position, k)
        feature, prompt, position, value = feature[keep], prompt[keep], position[keep], value[keep]
        starts = np.searchsorted(feature, touched)
        slot = np.arange(len(feature)) - np.repeat(starts, np.diff(np.r_[starts, len(feature)]))
        prompts, values = getattr(self, f"{name}_prompt"), getattr(self, f"{name}_value")
        prompts[touched], values[touched] = EMPTY, 0.0
        prompts[feature, slot], values[feature, slot] = prompt, value
        if with_position:
            self.top_position[touched] = 0
            self.top_position[feature, slot] = position


def attribution_writes(base: str, index: AttributionIndex) -> list[ArrayWrite]:
    """The arrays of one site's attribution index under ``base`` (``index/<gen>/<site>/``)."""
    out = []
    for name in ARRAYS + PAIRED_ARRAYS:
        data = getattr(index, name)
        if data is None:  # not a paired store
            continue
        chunk = (INDEX_ROW_CHUNK, *data.shape[1:])
        out.append(ArrayWrite(f"{base}{ATTRIBUTION_DIR}/{name}", data, chunk=chunk))
    return out


def load_attribution(
    source: Store, keys: set[str], base: str, *, paired: bool = False
) -> AttributionIndex | None:
    """One site's attribution index from an index generation; None when it has none (older,
    or a paired store's generation without the AtP sums)."""
    names = list(ARRAYS + (PAIRED_ARRAYS if paired else ()))
    paths = [f"{base}{ATTRIBUTION_DIR}/{name}" for name in names]
    if not all(f"{path}/zarr.json" in keys for path in paths):
        return None
    arrays = read_arrays(source, paths)
    return AttributionIndex(**{name: arrays[path] for name, path in zip(names, paths, strict=True)})
