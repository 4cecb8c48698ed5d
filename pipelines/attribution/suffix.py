"""Suffix forward passes: rerun only the layers after an intervention, read only the metric.

An intervention at layer l leaves the residual stream entering layer l
unchanged, so exact patching and ablation scans cache ``resid_pre_l`` from
one clean pass and run ``blocks[l:]`` per intervention. Metrics that read one
position (logit difference, target log-probability) also need the final norm
and unembedding at that position only, and no position after it (the model is
causal): rows are cut to the last position any of them reads. The unembedding
is a large share of a small model's forward pass, so this matters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from transformer_lens.utilities.activation_functions import apply_softcap

from circuitscan.pipelines.metrics import metric_per_prompt, read_positions
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec

Hook = tuple[str, Callable[..., torch.Tensor]]


def start_layer(site: HookSite) -> int:
    """The first block whose output an intervention at ``site`` can change."""
    return site.layer + 1 if site.point == "resid_post" else site.layer


def reads_one_position(metric: MetricSpec) -> bool:
    return metric.kind != "next_token_loss"


@torch.no_grad()
def cache_residuals(
    model: HookedSAETransformer, tokens: Int[torch.Tensor, "batch seq"], layers: Sequence[int]
) -> dict[int, Float[torch.Tensor, "batch seq d_model"]]:
    """The clean residual stream entering each of ``layers`` (``n_layers``: after the last)."""
    n_layers = model.cfg.n_layers
    wanted = {
        (HookSite(layer=layer, point="resid_pre") if layer < n_layers else
         HookSite(layer=n_layers - 1, point="resid_post")).hook_name: layer
        for layer in set(layers)
    }  # fmt: skip
    out: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: object) -> None:
        out[wanted[hook.name]] = x.detach()  # type: ignore[attr-defined]

    with model.hooks(fwd_hooks=[(name, keep) for name in wanted]):
        model(tokens, return_type=None)
    return out


def final_metric(
    model: HookedSAETransformer,
    resid: Float[torch.Tensor, "rows seq d_model"],
    metric: MetricSpec,
    *,
    lengths: Int[torch.Tensor, " rows"],
    tokens: Int[torch.Tensor, "rows prompt_seq"] | None,
    answer: Int[torch.Tensor, " rows"] | None,
    wrong: Int[torch.Tensor, " rows"] | None,
) -> Float[torch.Tensor, " rows"]:
    """The metric from the residual stream after the last block (final norm, unembedding).

    Differentiable; one-position metrics unembed only the position they read.
    ``tokens`` are the whole prompts: for a one-position metric ``resid`` may
    stop after the position it reads (``suffix_metric`` cuts it there).
    """
    if reads_one_position(metric):
        read = read_positions(metric, lengths).to(resid.device)
        resid = resid[torch.arange(resid.shape[0], device=resid.device), read][:, None]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)
    if reads_one_position(metric):
        return metric_per_prompt(
            logits,
            MetricSpec(kind=metric.kind),
            lengths=torch.ones_like(lengths),
            answer=answer,
            wrong=wrong,
        )
    return metric_per_prompt(
        logits, metric, lengths=lengths, tokens=tokens, answer=answer, wrong=wrong
    )


@torch.no_grad()
def suffix_metric(
    model: HookedSAETransformer,
    resid: Float[torch.Tensor, "rows seq d_model"],
    start: int,
    metric: MetricSpec,
    *,
    lengths: Int[torch.Tensor, " rows"],
    tokens: Int[torch.Tensor, "rows seq"],
    answer: Int[torch.Tensor, " rows"] | None,
    wrong: Int[torch.Tensor, " rows"] | None,
    hooks: Sequence[Hook] = (),
) -> Float[torch.Tensor, " rows"]:
    """The metric (its own units) after running ``blocks[start:]`` on ``resid`` with ``hooks``."""
    n_layers = model.cfg.n_layers
    if reads_one_position(metric):
        resid = resid[:, : int(read_positions(metric, lengths).max()) + 1]
    with model.hooks(fwd_hooks=list(hooks)):
        if start < n_layers:
            resid = model(resid, start_at_layer=start, stop_at_layer=n_layers)
        return final_metric(
            model, resid, metric, lengths=lengths, tokens=tokens, answer=answer, wrong=wrong
        )
