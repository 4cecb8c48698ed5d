"""A paired cache's extra arrays: the corrupted side of every site, named and paired positions.

Layout (docs/paired_caches.md), under a shard's prefix, written only when the
store's layout has ``pairing``:

    prompts/named_positions              uint8 [bytes]   JSON list of {name: index}, one per prompt
    prompts/corrupt_position             int32 [tokens]  paired corrupted position (-1: none)
    sites/<label>/corrupt_token_offsets  uint32 [tokens+1]  CSR over the clean tokens
    sites/<label>/corrupt_feature_ids    uint16|uint32 [c_entries]
    sites/<label>/corrupt_activations    value dtype [c_entries]  a' (SAE units)
    sites/<label>/corrupt_gradients      value dtype [c_entries]  ∂m/∂a at the clean prompt
    sites/<label>/error_atp              float32 [tokens]  (e(x') − e(x))·∂m/∂x
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.abc.store import Store

from circuitscan.schemas.store import StoreLayout
from circuitscan.services.store.encoding import ArrayWrite, feature_id_dtype, read_arrays

if TYPE_CHECKING:
    import torch

    from circuitscan.pipelines.site_cache import SiteCache

SITE_ARRAYS = (
    "corrupt_token_offsets",
    "corrupt_feature_ids",
    "corrupt_activations",
    "corrupt_gradients",
    "error_atp",
)
PROMPT_ARRAYS = ("named_positions", "corrupt_position")


@dataclass(frozen=True)
class ShardPairs:
    """Per-shard pairing data: each prompt's named positions and each token's paired position."""

    named_positions: list[dict[str, int]]
    corrupt_position: np.ndarray  # int32 [tokens]


@dataclass
class PairedSite:
    """One site of one shard of a paired cache: the corrupted side, decoded (float32 values)."""

    token_offsets: np.ndarray  # int64 [tokens+1]
    feature_ids: np.ndarray
    activations: np.ndarray
    gradients: np.ndarray
    error_atp: np.ndarray  # float32 [tokens]


def shard_pairs(
    named: list[dict[str, int]] | None, corrupt_position: torch.Tensor, n_prompts: int
) -> ShardPairs:
    """A shard's pairing data from what the worker computed (prompts without names: {})."""
    return ShardPairs(
        named_positions=named if named is not None else [{} for _ in range(n_prompts)],
        corrupt_position=corrupt_position.to("cpu").numpy().astype(np.int32),
    )


def check_pairs(
    layout: StoreLayout, pairs: ShardPairs | None, caches: dict[str, SiteCache], n: int
) -> str | None:
    """What is wrong with a shard's pairing data for this layout (None: nothing)."""
    if layout.pairing is None:
        return None if pairs is None else "the store is not paired but the shard has pairing data"
    if pairs is None:
        return "the store is paired but the shard has no pairing data"
    if pairs.corrupt_position.shape != (n,):
        return f"{pairs.corrupt_position.shape[0]} paired positions for {n} tokens"
    unpaired = sorted(label for label, cache in caches.items() if cache.corrupt is None)
    return f"sites {unpaired} have no corrupted side" if unpaired else None


def prompt_writes(prefix: str, pairs: ShardPairs) -> list[ArrayWrite]:
    named = json.dumps(pairs.named_positions).encode()
    return [
        ArrayWrite(prefix + "prompts/named_positions", np.frombuffer(named, dtype=np.uint8)),
        ArrayWrite(prefix + "prompts/corrupt_position", pairs.corrupt_position),
    ]


def site_writes(base: str, cache: SiteCache, layout: StoreLayout, d_sae: int) -> list[ArrayWrite]:
    """The corrupted side of one site, values in the layout's dtype like the clean ones."""
    from circuitscan.services.store.shard_io import encode_values as encode

    side = cache.corrupt
    assert side is not None
    ids = side.feature_ids.to("cpu").numpy().astype(feature_id_dtype(d_sae))
    offsets = side.token_offsets(cache.n_tokens).numpy().astype(np.uint32)
    return [
        ArrayWrite(base + "corrupt_token_offsets", offsets, delta=True),
        ArrayWrite(base + "corrupt_feature_ids", ids, delta=True),
        ArrayWrite(base + "corrupt_activations", encode(side.activations, layout.value_dtype)),
        ArrayWrite(
            base + "corrupt_gradients",
            encode(side.gradients, layout.value_dtype),
            shuffle="bitshuffle",
        ),
        ArrayWrite(base + "error_atp", side.error_atp.to("cpu").float().numpy()),
    ]


def read_paired_site(store: Store, layout: StoreLayout, base: str) -> PairedSite:
    """The corrupted side of the site under ``base`` (``shards/<s>/sites/<label>/``)."""
    from circuitscan.services.store.shard_io import decode_values

    arrays = read_arrays(store, [base + name for name in SITE_ARRAYS])
    dtype = layout.value_dtype
    return PairedSite(
        token_offsets=arrays[base + "corrupt_token_offsets"].astype(np.int64),
        feature_ids=arrays[base + "corrupt_feature_ids"],
        activations=decode_values(arrays[base + "corrupt_activations"], dtype),
        gradients=decode_values(arrays[base + "corrupt_gradients"], dtype),
        error_atp=arrays[base + "error_atp"].astype(np.float32),
    )


def read_shard_pairs(store: Store, prefix: str) -> ShardPairs:
    """A shard's named positions and paired positions (``prefix``: ``shards/<s>/``)."""
    arrays = read_arrays(store, [prefix + "prompts/" + name for name in PROMPT_ARRAYS])
    named = json.loads(arrays[prefix + "prompts/named_positions"].tobytes())
    return ShardPairs(
        named_positions=[{str(k): int(v) for k, v in item.items()} for item in named],
        corrupt_position=arrays[prefix + "prompts/corrupt_position"].astype(np.int32),
    )
