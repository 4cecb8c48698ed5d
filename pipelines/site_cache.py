"""The sparse cache of one SAE site: what the caching pipeline produces and the store writes.

Kept apart from ``caching`` so that store writers and readers need torch only,
not sae_lens and transformer_lens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int


@dataclass(frozen=True)
class CorruptEntries:
    """A paired cache's corrupted side at one site, indexed by the clean prompt's tokens.

    Entry ``k`` is feature ``feature_ids[k]`` active on the corrupted prompt at
    the position paired with clean token ``token_index[k]``; ``gradients`` is
    ∂m/∂a of that feature at the **clean** prompt, so that
    ``Σ a'·g (these) − Σ a·g (the clean entries)`` is AtP per (token, feature).
    ``error_atp`` is the SAE error node's AtP term per clean token,
    ``(e(x') − e(x)) · ∂m/∂x`` (metric units).
    """

    token_index: Int[torch.Tensor, " entries"]
    feature_ids: Int[torch.Tensor, " entries"]
    activations: Float[torch.Tensor, " entries"]
    gradients: Float[torch.Tensor, " entries"]
    error_atp: Float[torch.Tensor, " tokens"]

    def token_offsets(self, n_tokens: int) -> Int[torch.Tensor, " tokens_plus_one"]:
        """CSR offsets over the clean tokens into the corrupted entries."""
        counts = torch.bincount(self.token_index, minlength=n_tokens)
        offsets = torch.zeros(n_tokens + 1, dtype=torch.long, device=counts.device)
        offsets[1:] = counts.cumsum(0)
        return offsets


@dataclass(frozen=True)
class SiteCache:
    """Sparse cache of one SAE site over the real tokens of a batch.

    Real tokens are numbered prompt-major (prompt 0's tokens, then prompt
    1's...), padding skipped. Entries are sorted by (token, feature).
    """

    token_index: Int[torch.Tensor, " entries"]
    feature_ids: Int[torch.Tensor, " entries"]
    activations: Float[torch.Tensor, " entries"]
    gradients: Float[torch.Tensor, " entries"] | None
    error_norm: Float[torch.Tensor, " tokens"]
    dropped_mass: Float[torch.Tensor, " tokens"]
    n_tokens: int
    d_sae: int
    corrupt: CorruptEntries | None = None  # paired caches only

    def token_offsets(self) -> Int[torch.Tensor, " tokens_plus_one"]:
        """CSR offsets: token t's entries are ``[offsets[t], offsets[t+1])``."""
        counts = torch.bincount(self.token_index, minlength=self.n_tokens)
        offsets = torch.zeros(self.n_tokens + 1, dtype=torch.long, device=counts.device)
        offsets[1:] = counts.cumsum(0)
        return offsets

    def dense(self) -> Float[torch.Tensor, "tokens d_sae"]:
        """The activations as a dense matrix (zeros where not stored)."""
        out = torch.zeros(self.n_tokens, self.d_sae, dtype=self.activations.dtype)
        out[self.token_index, self.feature_ids] = self.activations
        return out
