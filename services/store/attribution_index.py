"""Corpus-wide attribution rankings kept in the merged index: per feature Σ a·g, Σ |a·g|, top hits.

For every stored entry (token, feature) of a store with gradients, the term
``a·∂m/∂a`` (metric units; minus the linear estimate of zero-ablating that
feature at that token) is summed per feature, signed and in absolute value,
and the entries and prompts where it is largest in magnitude are kept
(``top_*``: (prompt, position, term); ``prompt_*``: (prompt, Σ over the
prompt's positions)). Shards are folded in at commit from the objects the
commit's checksum check already read (no per-shard arrays are added, so a
shard costs no more bytes), and the arrays are persisted with the merged
index's generations under ``index/<generation>/<site>/attribution/``. An
index generation without them (written by an older circuitscan) leaves the
store without rankings until its index is rebuilt.

Sums are float64 over the values as stored (16-bit activations and gradients
widened to float32, multiplied in float64), so they equal a sum over the
shards' decoded arrays, whatever order shards were committed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.abc.store import Store

from circuitscan.schemas.errors import NotFoundError
from circuitscan.services.store.encoding import INDEX_ROW_CHUNK, ArrayWrite, read_arrays
from circuitscan.services.store.errors import StoreError
from circuitscan.services.store.shard_io import PromptShard, SiteShard

EMPTY = -1
ATTRIBUTION_DIR = "attribution"


class NoAttributionIndexError(StoreError, NotFoundError):
    """A store whose index holds no attribution sums (no gradients, or an older index)."""


@dataclass
class ShardAttribution:
    """One shard's attribution terms of one site, per entry, with where each entry sits."""

    feature: np.ndarray  # int64 [entries]
    prompt: np.ndarray  # int64 [entries], global prompt index
    position: np.ndarray  # int64 [entries]
    value: np.ndarray  # float64 [entries], a·g


def shard_attribution(site: SiteShard, prompts: PromptShard, prompt_start: int) -> ShardAttribution:
    """The a·g term of every stored entry of one site of one shard."""
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
    )


def _top_by_magnitude(
    feature: np.ndarray, value: np.ndarray, prompt: np.ndarray, position: np.ndarray, k: int
) -> np.ndarray:
    """Indices of the k entries of largest |value| per feature (ties: lower prompt, position)."""
    order = np.lexsort((position, prompt, -np.abs(value), feature))
    sorted_feature = feature[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_feature)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.arange(len(order)) - group_start
    return order[rank < k]


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

    @classmethod
    def empty(cls, d_sae: int, k: int) -> AttributionIndex:
        return cls(
            total=np.zeros(d_sae),
            total_abs=np.zeros(d_sae),
            top_prompt=np.full((d_sae, k), EMPTY, dtype=np.int64),
            top_position=np.zeros((d_sae, k), dtype=np.int64),
            top_value=np.zeros((d_sae, k)),
            prompt_prompt=np.full((d_sae, k), EMPTY, dtype=np.int64),
            prompt_value=np.zeros((d_sae, k)),
        )

    def merge(self, shard: ShardAttribution) -> None:
        """Fold one shard in (in place); the result does not depend on the order of shards."""
        d_sae = self.total.shape[0]
        self.total += np.bincount(shard.feature, weights=shard.value, minlength=d_sae)
        self.total_abs += np.bincount(shard.feature, weights=np.abs(shard.value), minlength=d_sae)
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
    for name in AttributionIndex.__dataclass_fields__:
        data = getattr(index, name)
        chunk = (INDEX_ROW_CHUNK, *data.shape[1:])
        out.append(ArrayWrite(f"{base}{ATTRIBUTION_DIR}/{name}", data, chunk=chunk))
    return out


def load_attribution(source: Store, keys: set[str], base: str) -> AttributionIndex | None:
    """One site's attribution index from an index generation; None when it has none (older)."""
    names = list(AttributionIndex.__dataclass_fields__)
    paths = [f"{base}{ATTRIBUTION_DIR}/{name}" for name in names]
    if not all(f"{path}/zarr.json" in keys for path in paths):
        return None
    arrays = read_arrays(source, paths)
    return AttributionIndex(**{name: arrays[path] for name, path in zip(names, paths, strict=True)})
