"""Synthetic site caches for store benchmarks and tests that need no model.

Each token gets ``k`` distinct random features with exponential activations and
normal gradients, so a shard's bytes and index work look like a real TopK SAE's.
"""

from __future__ import annotations

import numpy as np
import torch

from circuitscan.pipelines.site_cache import SiteCache


def random_site_cache(rng: np.random.Generator, n_tokens: int, d_sae: int, k: int) -> SiteCache:
    """One site's cache over ``n_tokens`` tokens, ``k`` of ``d_sae`` features a token."""
    features = np.sort(
        np.stack([rng.choice(d_sae, k, replace=False) for _ in range(n_tokens)]), axis=1
    )
    return SiteCache(
        token_index=torch.arange(n_tokens).repeat_interleave(k),
        feature_ids=torch.from_numpy(features.reshape(-1)),
        activations=torch.from_numpy(rng.exponential(1.0, n_tokens * k).astype(np.float32)),
        gradients=torch.from_numpy(rng.normal(0, 0.1, n_tokens * k).astype(np.float32)),
        error_norm=torch.rand(n_tokens),
        dropped_mass=torch.zeros(n_tokens),
        n_tokens=n_tokens,
        d_sae=d_sae,
    )
