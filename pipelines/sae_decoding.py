"""When an SAE's decoder is a plain linear map, and its rows per unit of activation.

sae_lens decodes ``a·W_dec + b_dec`` for its Standard, TopK, JumpReLU and
Gated SAEs, except that TopK SAEs with ``rescale_acts_by_decoder_norm``
divide each activation by its decoder row's norm first, and any SAE may
normalise its output or carry a hook on the reconstruction. Fast paths that
bypass ``sae.decode`` (sparse products, one decoder row per ablated feature)
use these two functions so they stay equal to it.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE

LINEAR_DECODERS = ("StandardSAE", "TopKSAE", "JumpReLUSAE", "GatedSAE")


def decodes_linearly(sae: SAE[Any]) -> bool:
    """True when ``sae.decode(a) == a @ decoder_rows(sae) + b_dec`` (reshaped)."""
    return (
        type(sae).__name__ in LINEAR_DECODERS
        and getattr(sae.cfg, "normalize_activations", "none") in (None, "none")
        and not sae.hook_sae_recons._forward_hooks  # nobody edits the reconstruction
    )


def decoder_rows(
    sae: SAE[Any], features: torch.Tensor | None = None
) -> Float[torch.Tensor, "rows d_in"]:
    """What one unit of each feature's activation adds to the reconstruction.

    ``features``: only these rows (an ablation batch needs a few, not d_sae).
    """
    rows = sae.W_dec if features is None else sae.W_dec[features]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return rows / rows.norm(dim=-1, keepdim=True)
    return rows
