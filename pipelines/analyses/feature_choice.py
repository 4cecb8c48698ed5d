"""Which SAE features to analyse: activations and attributions at chosen positions.

The analyses each take one feature; on a task the interesting ones are those
that move the task metric. A feature's attribution at position p is
``a_i · (d_i · ∂m/∂x_p)`` (DESIGN.md method 1) with the SAE's decoder-norm
rescaling folded in, so ``a_i · d_i`` is exactly its share of the reconstruction.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses.linear_parts import (
    AnalysisInputError,
    as_plain_sae,
    sae_encode_flat,
)
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.sae_splice import require_detached, sae_hook_name
from circuitscan.schemas.metrics import MetricSpec


def feature_attributions(
    model: HookedSAETransformer,
    sae: SAE,
    tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    positions: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Int[torch.Tensor, " batch"] | None,
    wrong: Int[torch.Tensor, " batch"] | None,
) -> tuple[Float[torch.Tensor, "batch d_sae"], Float[torch.Tensor, "batch d_sae"]]:
    """(activations, attributions) of every feature of ``sae`` at each prompt's position.

    Attributions are in metric units (logits for a logit difference); the SAE
    is not spliced, so the gradient is that of the original model.
    """
    require_detached(model, "feature_attributions", AnalysisInputError)
    if positions.shape != lengths.shape or bool((positions >= lengths).any()):
        raise AnalysisInputError("each prompt needs one position inside its real tokens")
    plain = as_plain_sae(sae)
    name = sae_hook_name(sae)
    held: list[torch.Tensor] = []

    def grab(act: torch.Tensor, hook: object) -> torch.Tensor:
        # A fresh leaf: the gradient reaches it whether or not the weights need grad.
        leaf = act.detach().requires_grad_(True)
        held.append(leaf)
        return leaf

    rows = torch.arange(tokens.shape[0], device=tokens.device)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, grab)]):
        logits = model(tokens)
        m = metric_per_prompt(
            logits, metric, lengths=lengths, tokens=tokens, answer=answer, wrong=wrong
        )
        (grad,) = torch.autograd.grad(m.sum(), held[0])
    x = held[0].detach()[rows, positions].flatten(1)
    g = grad[rows, positions].flatten(1)
    with torch.no_grad():
        acts = sae_encode_flat(plain, x.to(plain.W_enc.dtype), model.cfg.d_head).to(x.dtype)
        along = g @ plain.W_dec.to(g.dtype).T
    return acts, acts * along
