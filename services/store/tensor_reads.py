"""A store's contents as torch tensors: dense slices of a prompt and whole shards.

Apart from ``queries`` (numpy only) because importing torch costs seconds: the
CLI's store commands never need these, analyses on the stored data do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from circuitscan.services.store.errors import StoreError
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.queries import token_slot


def dense_slice(
    store: FeatureStore,
    site: str,
    prompt: int,
    *,
    positions: slice | None = None,
    features: slice | None = None,
    gradients: bool = False,
) -> Float[torch.Tensor, "positions features"]:
    """A prompt's activations (or gradients) as a dense float32 matrix; zeros where not stored."""
    d_sae = store.layout.site(site).d_sae
    shard_id, first, _ = token_slot(store, prompt, 0)
    n_pos = len(store.prompt_tokens(prompt))
    data = store.site_shard(shard_id, site)
    if gradients and data.gradients is None:
        raise StoreError("this store holds no gradients")
    values = data.gradients if gradients else data.activations
    lo, hi = int(data.token_offsets[first]), int(data.token_offsets[first + n_pos])
    rows = np.repeat(np.arange(n_pos), np.diff(data.token_offsets[first : first + n_pos + 1]))
    dense = torch.zeros(n_pos, d_sae, dtype=torch.float32)
    dense[torch.from_numpy(rows), torch.from_numpy(data.feature_ids[lo:hi].astype(np.int64))] = (
        torch.from_numpy(values[lo:hi].copy())
    )
    return dense[positions or slice(None), features or slice(None)]


@dataclass(frozen=True)
class ShardTensors:
    """One committed shard of one site as torch tensors (CSR over the shard's tokens)."""

    shard_id: int
    prompt_start: int
    token_ids: Int[torch.Tensor, " tokens"]
    prompt_offsets: Int[torch.Tensor, " prompts_plus_one"]
    token_offsets: Int[torch.Tensor, " tokens_plus_one"]
    feature_ids: Int[torch.Tensor, " entries"]
    activations: Float[torch.Tensor, " entries"]
    gradients: Float[torch.Tensor, " entries"] | None
    error_norm: Float[torch.Tensor, " tokens"]


def iter_shards(
    store: FeatureStore, site: str, *, device: torch.device | str = "cpu"
) -> Iterator[ShardTensors]:
    """Committed shards of a site in shard order, decoded to tensors on ``device``."""
    store.layout.site(site)
    for shard_id, entry in sorted(store.committed_entries().items()):
        data = store.site_shard(shard_id, site)
        prompts = store.prompt_shard(shard_id)

        def tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

        yield ShardTensors(
            shard_id=shard_id,
            prompt_start=entry.prompt_start,
            token_ids=tensor(prompts.token_ids.astype(np.int64), torch.long),
            prompt_offsets=tensor(prompts.prompt_offsets, torch.long),
            token_offsets=tensor(data.token_offsets, torch.long),
            feature_ids=tensor(data.feature_ids.astype(np.int64), torch.long),
            activations=tensor(data.activations, torch.float32),
            gradients=tensor(data.gradients, torch.float32) if data.gradients is not None else None,
            error_norm=tensor(data.error_norm, torch.float32),
        )
