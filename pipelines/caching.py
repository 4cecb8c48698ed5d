"""Sparse SAE feature activations, metric gradients and error norms for a batch.

One forward pass (and, with gradients, one backward pass) over a right-padded
batch gives, for every SAE site, the non-zero (or top-k) features of every
real token, ∂metric/∂activation for each of them, and the SAE reconstruction
error norm per token. Padding never appears in the result.

Gradient semantics. Each SAE is spliced transparently (see
``sae_splice.transparent_splice``): the site's output is ``x`` exactly in
value (the model's output is unchanged) while ``∂out/∂a = W_dec`` and
``∂out/∂x = I``. So ∂m/∂a_i equals ``d_i · ∂m/∂x`` in the unmodified model —
exactly the effect on the metric of nudging feature i with everything
downstream (other SAEs' errors included) recomputed. (sae_lens's own error
term is computed under ``no_grad``; with several SAEs it would cut the
gradient through downstream error terms.) The SAEs are never attached to the
model, and a model with SAEs attached by the caller is refused, not reset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.sae_decoding import decoder_rows, decodes_linearly
from circuitscan.pipelines.sae_splice import require_detached, transparent_splice
from circuitscan.pipelines.site_cache import CorruptEntries, SiteCache
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec


def site_label(sae: SAE) -> str:
    """The store label of the site an SAE reads (e.g. ``L6.z``)."""
    return HookSite.from_hook_name(sae.cfg.metadata.hook_name).label


@contextlib.contextmanager
def _frozen(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Turn off parameter gradients (only activation gradients are wanted), then restore."""
    params = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _real_mask(lengths: Int[torch.Tensor, " batch"], seq: int) -> torch.Tensor:
    steps = torch.arange(seq, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def _sparsify(
    acts: Float[torch.Tensor, "tokens d_sae"],
    grads: Float[torch.Tensor, "tokens d_sae"] | None,
    top_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(token_index, feature_ids, activations, gradients, dropped_mass) of the kept entries."""
    if top_k is not None and top_k < acts.shape[-1]:
        _, keep_idx = acts.topk(top_k, dim=-1, sorted=False)
        keep = torch.zeros_like(acts, dtype=torch.bool).scatter_(-1, keep_idx, True)
        keep &= acts != 0
        dropped = (acts * ~keep).sum(-1)
    else:
        keep = acts != 0
        dropped = torch.zeros(acts.shape[0], dtype=acts.dtype, device=acts.device)
    token_index, feature_ids = keep.nonzero(as_tuple=True)
    values = acts[token_index, feature_ids]
    grad_values = grads[token_index, feature_ids] if grads is not None else None
    return token_index, feature_ids, values, grad_values, dropped


def cache_batch(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec | None,
    *,
    answer: Int[torch.Tensor, " batch"] | None = None,
    wrong: Int[torch.Tensor, " batch"] | None = None,
    top_k: int | None = None,
    gradients: bool = True,
    out_device: torch.device | str = "cpu",
) -> dict[str, SiteCache]:
    """Cache every SAE site of a right-padded batch; keys are site labels.

    Activations are in SAE units, gradients in metric units per activation
    unit (∂ sum-over-batch metric / ∂a, which is each prompt's own gradient
    because prompts do not interact), error norms in the site's activation
    units. ``top_k`` keeps the k largest features per token and records the
    dropped activation mass. ``gradients=False`` skips the backward pass and
    needs no metric; the forward then stops after the last SAE's layer.
    """
    if gradients and metric is None:
        raise UserInputError("caching gradients needs a metric")
    require_detached(model, "cache_batch")
    labels = [site_label(sae) for sae in saes]
    if len(set(labels)) != len(labels):
        raise UserInputError(f"two SAEs read the same site: {labels}")
    tokens = tokens.to(model.cfg.device)
    lengths = lengths.to(tokens.device)
    real = _real_mask(lengths, tokens.shape[1])
    if gradients:
        acts, grads, errors = _forward_backward(
            model,
            saes,
            tokens,
            lengths,
            metric,
            answer,
            wrong,  # type: ignore[arg-type]
        )
        errors = {label: error[real] for label, error in errors.items()}
    else:
        acts, errors = _forward_only(model, saes, tokens, real)
        grads = {}
    out: dict[str, SiteCache] = {}
    n_tokens = int(lengths.sum())
    for sae, label in zip(saes, labels, strict=True):
        site_acts = acts[label][real]
        site_grads = grads[label][real] if gradients else None
        token_index, feature_ids, values, grad_values, dropped = _sparsify(
            site_acts, site_grads, top_k
        )
        out[label] = SiteCache(
            token_index=token_index.to(out_device),
            feature_ids=feature_ids.to(out_device),
            activations=values.detach().to(out_device),
            gradients=grad_values.to(out_device) if grad_values is not None else None,
            error_norm=errors[label].to(out_device),
            dropped_mass=dropped.detach().to(out_device),
            n_tokens=n_tokens,
            d_sae=int(sae.cfg.d_sae),
        )
    return out


def _error_norm(error: torch.Tensor, batch_seq: int) -> torch.Tensor:
    return error.flatten(batch_seq).norm(dim=-1)


def reconstruction_error_norm(
    sae: SAE, x: Float[torch.Tensor, "tokens ..."], acts: Float[torch.Tensor, "tokens d_sae"]
) -> Float[torch.Tensor, " tokens"]:
    """‖x − decode(a)‖ per token, ``x`` flattened per token.

    Codes are sparse (tens of features of thousands active), so where the
    decoder is linear the reconstruction is a sparse product: its cost grows
    with the active features, not with d_sae, which takes it off the
    critical path of caching (a dense decode costs as much as the encode).
    """
    flat = x.reshape(x.shape[0], -1)
    if decodes_linearly(sae):
        recon = torch.sparse.mm(acts.to_sparse(), decoder_rows(sae)) + sae.b_dec
    else:
        recon = sae.decode(acts).reshape(flat.shape)
    return (flat - recon.to(flat.dtype)).norm(dim=-1)


def _forward_only(
    model: HookedSAETransformer, saes: Sequence[SAE], tokens: torch.Tensor, real: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SAE codes of every position, and reconstruction error norms of the real tokens."""
    inputs: dict[str, torch.Tensor] = {}

    def capture(tensor: torch.Tensor, hook) -> torch.Tensor:
        inputs[hook.name] = tensor
        return tensor

    hook_names = [sae.cfg.metadata.hook_name for sae in saes]
    last_layer = max(HookSite.from_hook_name(name).layer for name in hook_names)
    with torch.no_grad():
        model.run_with_hooks(
            tokens,
            fwd_hooks=[(name, capture) for name in hook_names],
            stop_at_layer=last_layer + 1,
        )
        acts, errors = {}, {}
        for sae, name in zip(saes, hook_names, strict=True):
            label = site_label(sae)
            x = inputs[name].to(sae.dtype)
            feature_acts = sae.encode(x)
            acts[label] = feature_acts
            errors[label] = reconstruction_error_norm(sae, x[real], feature_acts[real])
    return acts, errors


def _forward_backward(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    metric: MetricSpec,
    answer: torch.Tensor | None,
    wrong: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    leaves: dict[str, torch.Tensor] = {}
    errors: dict[str, torch.Tensor] = {}
    fwd_hooks = []
    for sae in saes:

        def splice(tensor: torch.Tensor, hook, sae: SAE = sae, label: str = site_label(sae)):
            out, acts, error = transparent_splice(sae, tensor, grad=True)
            leaves[label] = acts
            errors[label] = _error_norm(error.detach(), 2)
            return out

        fwd_hooks.append((sae.cfg.metadata.hook_name, splice))
    with _frozen([model, *saes]), model.hooks(fwd_hooks=fwd_hooks):
        logits = model(tokens)
        total = metric_per_prompt(
            logits, metric, lengths=lengths, tokens=tokens, answer=answer, wrong=wrong
        ).sum()
        labels = list(leaves)
        grads = torch.autograd.grad(total, [leaves[label] for label in labels], allow_unused=True)
    grad_map = {
        label: grad if grad is not None else torch.zeros_like(leaves[label])
        for label, grad in zip(labels, grads, strict=True)
    }
    return {label: leaf.detach() for label, leaf in leaves.items()}, grad_map, errors


def merge_site_caches(batches: Sequence[dict[str, SiteCache]]) -> dict[str, SiteCache]:
    """Concatenate the caches of consecutive batches (tokens renumbered in order)."""
    if not batches:
        raise ValueError("nothing to merge")
    out = {}
    for label in batches[0]:
        parts = [batch[label] for batch in batches]
        starts = [0]
        for part in parts[:-1]:
            starts.append(starts[-1] + part.n_tokens)
        grads = [part.gradients for part in parts]
        out[label] = SiteCache(
            token_index=torch.cat([p.token_index + s for p, s in zip(parts, starts, strict=True)]),
            feature_ids=torch.cat([p.feature_ids for p in parts]),
            activations=torch.cat([p.activations for p in parts]),
            gradients=None if any(g is None for g in grads) else torch.cat(grads),  # type: ignore[arg-type]
            error_norm=torch.cat([p.error_norm for p in parts]),
            dropped_mass=torch.cat([p.dropped_mass for p in parts]),
            n_tokens=sum(p.n_tokens for p in parts),
            d_sae=parts[0].d_sae,
            corrupt=_merge_corrupt(parts, starts),
        )
    return out


def _merge_corrupt(parts: Sequence[SiteCache], starts: Sequence[int]) -> CorruptEntries | None:
    """The paired caches' corrupted sides, concatenated like the clean entries (or None)."""
    sides = [part.corrupt for part in parts]
    if any(side is None for side in sides):
        return None
    present = [side for side in sides if side is not None]
    return CorruptEntries(
        token_index=torch.cat([c.token_index + s for c, s in zip(present, starts, strict=True)]),
        feature_ids=torch.cat([c.feature_ids for c in present]),
        activations=torch.cat([c.activations for c in present]),
        gradients=torch.cat([c.gradients for c in present]),
        error_atp=torch.cat([c.error_atp for c in present]),
    )
