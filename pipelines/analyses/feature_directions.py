"""What an SAE feature's decoder direction does, from the weights alone.

For feature ``i`` with decoder row ``d_i`` mapped into the residual stream
(through ``W_O`` for hook_z SAEs) and normalised, ``d̂_i = d_i / ‖d_i‖``:

- **logit effects**: ``W_U · norm_f(d̂_i)``, the logits the direction writes
  directly through the final norm (its scale frozen at 1 and its bias
  dropped: the bias does not depend on the feature, and a scale only
  rescales every token alike). The tokens it promotes most are the largest
  entries, the ones it suppresses the smallest.
- **reading heads**: for every attention head h of a layer that reads the
  direction, the gain ``‖norm_1(d̂_i) · W_V^h W_O^h‖``: how much the head's
  OV circuit carries the direction forward per unit of it at a source the
  head attends to fully (``norm_1`` the head's input norm, scale 1). This is
  the OV half of head → feature → logit, for every head and feature at once.

Neither depends on prompts, so a store computes them once per site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses.head_feature_logit import _FIRST_READER_OFFSET
from circuitscan.pipelines.analyses.linear_parts import (
    AnalysisInputError,
    as_plain_sae,
    norm_linear,
)
from circuitscan.pipelines.sae_splice import sae_hook_name
from circuitscan.schemas.hooks import HookSite


@dataclass(frozen=True)
class FeatureDirections:
    """Per feature of one SAE: top ± logit effects and the heads that read it most."""

    top_ids: Int[torch.Tensor, "d_sae k"]  # tokens promoted most, largest first
    top_values: Float[torch.Tensor, "d_sae k"]  # their logit effects (logits per unit d̂)
    bottom_ids: Int[torch.Tensor, "d_sae k"]  # tokens suppressed most, most negative first
    bottom_values: Float[torch.Tensor, "d_sae k"]
    head_layers: Int[torch.Tensor, "d_sae heads"]  # reading heads, largest gain first
    head_indices: Int[torch.Tensor, "d_sae heads"]
    head_gains: Float[torch.Tensor, "d_sae heads"]


@torch.no_grad()
def residual_directions(
    model: HookedSAETransformer, sae: SAE
) -> tuple[Float[torch.Tensor, "d_sae d_model"], int]:
    """Every feature's unit decoder direction in the residual stream, and the first reading layer."""
    site = HookSite.from_hook_name(sae_hook_name(sae))
    if site.point not in _FIRST_READER_OFFSET:
        raise AnalysisInputError(f"feature directions need a residual-space SAE, got {site}")
    directions = as_plain_sae(sae).W_dec.detach().to(model.cfg.dtype)
    if site.point == "z":
        directions = directions @ model.blocks[site.layer].attn.W_O.reshape(-1, model.cfg.d_model)
    norms = directions.norm(dim=-1, keepdim=True)
    unit = directions / torch.where(norms > 0, norms, torch.ones_like(norms))
    return unit, site.layer + _FIRST_READER_OFFSET[site.point]


@torch.no_grad()
def logit_effects(
    model: HookedSAETransformer, directions: Float[torch.Tensor, "d_sae d_model"]
) -> Float[torch.Tensor, "d_sae vocab"]:
    """``W_U · norm_f(d̂)`` for each direction (final norm at scale 1, no bias)."""
    one = torch.ones(1, dtype=directions.dtype)
    return norm_linear(model.ln_final, directions, one) @ model.W_U


@torch.no_grad()
def head_gains(
    model: HookedSAETransformer, directions: Float[torch.Tensor, "d_sae d_model"], layer: int
) -> Float[torch.Tensor, "d_sae head"]:
    """``‖norm_1(d̂) · W_V^h W_O^h‖`` for every query head h of ``layer``."""
    block = model.blocks[layer]
    one = torch.ones(1, dtype=directions.dtype)
    x = norm_linear(block.ln1, directions, one)
    written = torch.einsum("fm,hmd,hdn->fhn", x, block.attn.W_V, block.attn.W_O)
    return written.norm(dim=-1)


@torch.no_grad()
def feature_directions(
    model: HookedSAETransformer,
    sae: SAE,
    *,
    k: int = 10,
    heads: int = 5,
    chunk: int = 512,
) -> FeatureDirections:
    """Top ``k`` promoted / suppressed tokens and the ``heads`` reading heads of every feature.

    Computed ``chunk`` features at a time, so the [features, vocab] logit
    block stays small on large vocabularies.
    """
    unit, first = residual_directions(model, sae)
    vocab = int(model.cfg.d_vocab_out)
    k = min(k, vocab)
    tops, bottoms = [], []
    for start in range(0, unit.shape[0], chunk):
        logits = logit_effects(model, unit[start : start + chunk])
        tops.append(logits.topk(k, dim=-1))
        bottoms.append((-logits).topk(k, dim=-1))
    layers = list(range(first, model.cfg.n_layers))
    n_heads = int(model.cfg.n_heads)
    if layers:
        gains = torch.cat([head_gains(model, unit, layer) for layer in layers], dim=-1)
        best = gains.topk(min(heads, gains.shape[-1]), dim=-1)
        head_values, flat = best.values, best.indices
    else:  # a site after the last block: no head reads it
        head_values = torch.zeros(unit.shape[0], 0, dtype=unit.dtype)
        flat = torch.zeros(unit.shape[0], 0, dtype=torch.long)
    return FeatureDirections(
        top_ids=torch.cat([t.indices for t in tops]),
        top_values=torch.cat([t.values for t in tops]),
        bottom_ids=torch.cat([b.indices for b in bottoms]),
        bottom_values=-torch.cat([b.values for b in bottoms]),
        head_layers=flat // n_heads + first,
        head_indices=flat % n_heads,
        head_gains=head_values,
    )
