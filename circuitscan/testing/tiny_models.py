"""Tiny seeded transformers and SAEs built from config, for tests and benches.

Every object here is deterministic given its seed, needs no files and no
network, and runs in float64 when exactness matters.
"""

from __future__ import annotations

from typing import Literal

import torch
from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from transformer_lens import HookedTransformerConfig

from circuitscan.pipelines.site_width import site_width
from circuitscan.schemas.hooks import HookSite


def build_tiny_model(
    *,
    n_layers: int = 2,
    d_model: int = 16,
    n_heads: int = 4,
    d_head: int = 4,
    d_mlp: int = 32,
    d_vocab: int = 40,
    n_ctx: int = 32,
    normalization: Literal["LN", "RMS"] | None = "LN",
    n_key_value_heads: int | None = None,
    attn_only: bool = False,
    positional: Literal["standard", "rotary"] = "standard",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> HookedSAETransformer:
    """A randomly initialised HookedSAETransformer (no tokenizer; feed token ids)."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=None if attn_only else d_mlp,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type=normalization,
        n_key_value_heads=n_key_value_heads,
        attn_only=attn_only,
        positional_embedding_type=positional,
        rotary_dim=d_head if positional == "rotary" else None,
        seed=seed,
        dtype=dtype,
        device="cpu",
        init_weights=True,
        # Larger init than the default so attention patterns are not uniform
        # and the QK maths is exercised.
        initializer_range=0.5,
    )
    model = HookedSAETransformer(cfg)
    model.eval()
    return model


def build_tiny_sae(
    model: HookedSAETransformer,
    site: HookSite,
    *,
    d_sae: int = 32,
    architecture: Literal["standard", "topk"] = "standard",
    k: int = 8,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> StandardSAE | TopKSAE:
    """A seeded random SAE at ``site`` whose features fire on a fair share of tokens."""
    dtype = dtype or model.cfg.dtype
    d_in = site_width(model, site)
    common = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "reshape_activations": "hook_z" if site.point == "z" else "none",
    }
    cfg: StandardSAEConfig | TopKSAEConfig
    if architecture == "topk":
        cfg = TopKSAEConfig(k=k, **common)  # type: ignore[arg-type]
    else:
        cfg = StandardSAEConfig(**common)  # type: ignore[arg-type]
    cfg.metadata.hook_name = site.hook_name
    cfg.metadata.model_name = "tiny"
    sae: StandardSAE | TopKSAE = TopKSAE(cfg) if architecture == "topk" else StandardSAE(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float64)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(w_dec.to(sae.W_dec.dtype))
        sae.W_enc.copy_(w_dec.T.to(sae.W_enc.dtype))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=generator, dtype=torch.float64))
        if hasattr(sae, "b_enc"):
            sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=generator, dtype=torch.float64))
    if site.point == "z":
        sae.turn_on_forward_pass_hook_z_reshaping()
    return sae.eval()
