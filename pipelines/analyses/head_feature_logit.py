"""Head → feature → logit: which attention heads read an SAE feature and write an answer.

For a feature direction ``d_i`` in the residual stream and a downstream head
h at layer L, the head's direct contribution to the logits per unit of the
feature at a source it attends to fully is

    U · norm_f( W_O^h W_V^h · norm_1(d_i) )

with both norms' scales frozen (``norm_f`` the final norm at the destination,
``norm_1`` the head's input norm at the source) and their biases dropped: the
bias terms do not depend on the feature. That is per unit of activation at
full attention, a property of the weights. On a prompt the head's actual
direct contribution through the feature is

    a_i(src) · A^h[dest, src] · (the per-unit logit difference)

(``activation`` and ``attention`` given): the change in logit[answer] −
logit[wrong] at dest when the feature's part ``a_i · d_i`` is removed from
what head h reads at src, with attention patterns and norm scales frozen.
Patterns do not read values, so at frozen norm scales that removal is exactly
linear; with the final norm's scale free it holds to first order. Grouped-
query models use the per-query-head (repeated) value weights.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses.linear_parts import (
    AnalysisInputError,
    as_plain_sae,
    norm_linear,
)
from circuitscan.pipelines.sae_splice import require_detached, sae_hook_name
from circuitscan.schemas.analyses import HeadFeatureLogitResult, HeadLogitEffect, TokenEffect
from circuitscan.schemas.hooks import FINAL_LN_SCALE_HOOK, HookSite, block_hook

# Points whose output lands in the residual stream read by the next layer.
_FIRST_READER_OFFSET = {"resid_pre": 0, "resid_mid": 1, "resid_post": 1, "attn_out": 1,
                        "mlp_out": 1, "z": 1}  # fmt: skip


def feature_direction(
    model: HookedSAETransformer, sae: SAE, feature: int
) -> tuple[Float[torch.Tensor, " d_model"], int]:
    """The feature's decoder row in the residual stream, and the first layer that reads it."""
    site = HookSite.from_hook_name(sae_hook_name(sae))
    if site.point not in _FIRST_READER_OFFSET:
        raise AnalysisInputError(f"head→feature→logit needs a residual-space SAE, got {site}")
    if not 0 <= feature < sae.cfg.d_sae:
        raise AnalysisInputError(f"feature {feature} out of range for d_sae {sae.cfg.d_sae}")
    # Per unit of the activation the SAE reports (decoder-norm rescaling folded in).
    d = as_plain_sae(sae).W_dec[feature].detach().to(model.cfg.dtype)
    if site.point == "z":
        d = d @ model.blocks[site.layer].attn.W_O.reshape(-1, model.cfg.d_model)
    return d, site.layer + _FIRST_READER_OFFSET[site.point]


@torch.no_grad()
def frozen_norm_scales(
    model: HookedSAETransformer, tokens: Int[torch.Tensor, " seq"], src_pos: int, dest_pos: int
) -> tuple[float, Float[torch.Tensor, " n_layers"]]:
    """(final-norm scale at dest_pos, each layer's attention-input norm scale at src_pos)."""
    # Scales of the model's own forward pass, which the weights-only effects assume.
    require_detached(model, "frozen_norm_scales", AnalysisInputError)
    _, cache = model.run_with_cache(
        tokens.unsqueeze(0), names_filter=lambda n: n.endswith("hook_scale")
    )
    final = cache[FINAL_LN_SCALE_HOOK][0, dest_pos] if FINAL_LN_SCALE_HOOK in cache else None
    ones = torch.ones(model.cfg.n_layers, dtype=model.cfg.dtype)
    inputs = torch.stack(
        [
            cache[block_hook(layer, "ln1_scale")][0, src_pos].reshape(())
            if block_hook(layer, "ln1_scale") in cache
            else ones[layer]
            for layer in range(model.cfg.n_layers)
        ]
    )
    return (1.0 if final is None else float(final)), inputs


@torch.no_grad()
def source_attention(
    model: HookedSAETransformer, tokens: Int[torch.Tensor, " seq"], src_pos: int, dest_pos: int
) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Every head's attention weight from ``dest_pos`` to ``src_pos`` in the model's forward pass."""
    require_detached(model, "source_attention", AnalysisInputError)
    if not 0 <= src_pos <= dest_pos < tokens.shape[0]:
        raise AnalysisInputError(
            f"source {src_pos} must lie at or before destination {dest_pos}, inside the "
            f"{tokens.shape[0]} tokens (a head attends only backwards)"
        )
    _, cache = model.run_with_cache(
        tokens.unsqueeze(0), names_filter=lambda n: n.endswith("attn.hook_pattern")
    )
    return torch.stack(
        [
            cache[block_hook(layer, "pattern")][0, :, dest_pos, src_pos]
            for layer in range(model.cfg.n_layers)
        ]
    )


@torch.no_grad()
def head_logit_vectors(
    model: HookedSAETransformer,
    direction: Float[torch.Tensor, " d_model"],
    layer: int,
    norm_scale: float,
    input_scale: float = 1.0,
) -> Float[torch.Tensor, "head vocab"]:
    """Per query head of ``layer``: logits written per unit of ``direction`` (logit units)."""
    block = model.blocks[layer]
    scale = torch.tensor([input_scale], dtype=direction.dtype)
    x = norm_linear(block.ln1, direction, scale)
    out = torch.einsum("m,hmd,hdn->hn", x, block.attn.W_V, block.attn.W_O)
    final = norm_linear(model.ln_final, out, torch.tensor([norm_scale], dtype=out.dtype))
    return final @ model.W_U


@torch.no_grad()
def head_feature_logit(
    model: HookedSAETransformer,
    sae: SAE,
    feature: int,
    answer_id: int,
    wrong_id: int,
    norm_scale: float,
    *,
    input_scales: Float[torch.Tensor, " n_layers"] | None = None,
    top_k: int = 8,
    activation: float | None = None,
    attention: Float[torch.Tensor, "n_layers n_heads"] | None = None,
) -> HeadFeatureLogitResult:
    """Every downstream head's direct logit-difference effect through ``feature``, ranked.

    ``norm_scale`` is the final norm's frozen scale at the destination and
    ``input_scales[L]`` each layer's attention-input norm scale at the source
    (see ``frozen_norm_scales``; default 1, i.e. the direction as if already
    normalised). Values are logits per unit feature activation; with the
    feature's ``activation`` at the source and ``attention`` (see
    ``source_attention``) each head also gets the prompt's actual
    ``contribution`` = activation × attention × logit_diff.
    """
    vocab = model.cfg.d_vocab_out
    for tok in (answer_id, wrong_id):
        if not 0 <= tok < vocab:
            raise AnalysisInputError(f"token id {tok} outside the vocabulary of {vocab}")
    direction, first = feature_direction(model, sae, feature)
    tokenizer = model.tokenizer
    heads: list[HeadLogitEffect] = []
    for layer in range(first, model.cfg.n_layers):
        in_scale = 1.0 if input_scales is None else float(input_scales[layer])
        logits = head_logit_vectors(model, direction, layer, norm_scale, in_scale)
        for h in range(logits.shape[0]):
            row = logits[h]

            def effects(ids: torch.Tensor, row: torch.Tensor = row) -> list[TokenEffect]:
                return [
                    TokenEffect(
                        token_id=int(i),
                        token=tokenizer.decode([int(i)]) if tokenizer is not None else None,
                        logit=float(row[i]),
                    )
                    for i in ids
                ]

            per_unit = float(row[answer_id] - row[wrong_id])
            weight = None if attention is None else float(attention[layer, h])
            heads.append(
                HeadLogitEffect(
                    layer=layer,
                    head=h,
                    logit_diff=per_unit,
                    top_tokens=effects(row.topk(min(top_k, vocab)).indices),
                    bottom_tokens=effects((-row).topk(min(top_k, vocab)).indices),
                    attention=weight,
                    contribution=None
                    if weight is None or activation is None
                    else activation * weight * per_unit,
                )
            )
    heads.sort(key=lambda e: -abs(e.logit_diff))
    return HeadFeatureLogitResult(
        sae_site=HookSite.from_hook_name(sae_hook_name(sae)).label,
        feature=feature,
        answer_id=answer_id,
        wrong_id=wrong_id,
        heads=heads,
    )
