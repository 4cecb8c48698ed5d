"""Paired caching: what attribution patching needs from a clean and a corrupted pass, sparse.

The clean prompts run forward and backward, exactly as :func:`caching.cache_batch`
caches them (sparse activations ``a``, ``g = ∂m/∂a``, error norms); the
corrupted prompts run forward only, up to the last SAE's layer. Per site the
result also holds the corrupted prompt's sparse activations ``a'`` at the
position paired with each clean token (the same index, or through a position
map such as ``positions.end_aligned_map``), the clean-point gradient ``g`` of
each of those features, and per clean token the SAE error node's AtP term
``(e(x') − e(x)) · ∂m/∂x``. Then for every feature at every token

    AtP = Σ_corrupted entries a'·g − Σ_clean entries a·g

from stored values alone, and the error node's AtP is the stored term: the
same quantities ``attribution.run_atp`` computes with nodes ``feature`` and
``sae_error`` (the engine's corrupted run splices the SAEs transparently, so
its activations are those of the unspliced model, as here). A clean position
with no counterpart keeps its clean values: it is not patched (Δ = 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution.positions import (
    UNDEFINED,
    check_aligned,
    check_position_map,
    remap_positions,
)
from circuitscan.pipelines.attribution.recording import frozen_parameters
from circuitscan.pipelines.caching import _real_mask, _sparsify, site_label
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.sae_splice import require_detached, transparent_splice
from circuitscan.pipelines.site_cache import CorruptEntries, SiteCache
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec

Tensors = dict[str, torch.Tensor]


def _clean_pass(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    metric: MetricSpec,
    answer: torch.Tensor | None,
    wrong: torch.Tensor | None,
) -> tuple[Tensors, Tensors, Tensors, Tensors]:
    """(activations, errors, ∂m/∂activations, ∂m/∂errors) per site label, [batch, pos, ...]."""
    acts: Tensors = {}
    errs: Tensors = {}
    hooks = []
    for sae in saes:

        def splice(x: torch.Tensor, hook: object, sae: SAE[Any] = sae) -> torch.Tensor:
            out, a, e = transparent_splice(sae, x, grad=True)
            acts[site_label(sae)], errs[site_label(sae)] = a, e
            return out

        hooks.append((sae.cfg.metadata.hook_name, splice))
    with contextlib.ExitStack() as stack:
        for module in (model, *saes):
            stack.enter_context(frozen_parameters(module))
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        logits = model(tokens)
        total = metric_per_prompt(
            logits, metric, lengths=lengths, tokens=tokens, answer=answer, wrong=wrong
        ).sum()
        labels = list(acts)
        leaves = [acts[label] for label in labels] + [errs[label] for label in labels]
        raw = torch.autograd.grad(total, leaves, allow_unused=True)
    grads = [
        torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, raw, strict=True)
    ]
    n = len(labels)
    return (
        {label: acts[label].detach() for label in labels},
        {label: errs[label].detach() for label in labels},
        dict(zip(labels, grads[:n], strict=True)),
        dict(zip(labels, grads[n:], strict=True)),
    )


def _corrupt_pass(
    model: HookedSAETransformer, saes: Sequence[SAE[Any]], tokens: torch.Tensor
) -> tuple[Tensors, Tensors]:
    """(activations, errors) per site label of a forward-only pass that stops after the last SAE."""
    acts: Tensors = {}
    errs: Tensors = {}
    hooks = []
    for sae in saes:

        def record(x: torch.Tensor, hook: object, sae: SAE[Any] = sae) -> torch.Tensor:
            _, a, e = transparent_splice(sae, x)
            acts[site_label(sae)], errs[site_label(sae)] = a, e
            return x

        hooks.append((sae.cfg.metadata.hook_name, record))
    last = max(HookSite.from_hook_name(sae.cfg.metadata.hook_name).layer for sae in saes)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens, stop_at_layer=last + 1)
    return acts, errs


def same_position_map(lengths: Int[torch.Tensor, " batch"], seq: int) -> torch.Tensor:
    """The one-to-one pairing of equal-length prompts (padding UNDEFINED)."""
    steps = torch.arange(seq)[None, :]
    return torch.where(steps < lengths.cpu()[:, None], steps, UNDEFINED)


def cache_pairs(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]],
    tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    corrupt_tokens: Int[torch.Tensor, "batch corrupt_seq"],
    corrupt_lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    *,
    answer: Int[torch.Tensor, " batch"] | None = None,
    wrong: Int[torch.Tensor, " batch"] | None = None,
    top_k: int | None = None,
    position_map: Int[torch.Tensor, "batch seq"] | None = None,
    out_device: torch.device | str = "cpu",
) -> tuple[dict[str, SiteCache], Int[torch.Tensor, " tokens"]]:
    """Paired caches of every SAE site of a right-padded batch, and each real clean token's
    paired corrupted position (UNDEFINED: none).

    Clean-side fields are those of :func:`caching.cache_batch` (same units);
    ``SiteCache.corrupt`` holds the corrupted side (see the module docstring).
    Without ``position_map`` clean and corrupted prompts must have equal
    token lengths and pair position by position.
    """
    require_detached(model, "cache_pairs")
    labels = [site_label(sae) for sae in saes]
    if len(set(labels)) != len(labels):
        raise UserInputError(f"two SAEs read the same site: {labels}")
    tokens = tokens.to(model.cfg.device)
    lengths = lengths.to(tokens.device)
    corrupt_tokens = corrupt_tokens.to(tokens.device)
    if position_map is None:
        check_aligned(lengths.cpu(), corrupt_lengths.cpu())
        position_map = same_position_map(lengths, tokens.shape[1])
    else:
        position_map = check_position_map(
            position_map, tuple(tokens.shape), lengths.cpu(), corrupt_lengths.cpu()
        )
    real = _real_mask(lengths, tokens.shape[1])
    acts, errs, g_acts, g_errs = _clean_pass(model, saes, tokens, lengths, metric, answer, wrong)
    c_acts, c_errs = _corrupt_pass(model, saes, corrupt_tokens)
    out: dict[str, SiteCache] = {}
    n_tokens = int(lengths.sum())
    for sae, label in zip(saes, labels, strict=True):
        paired_acts = remap_positions(c_acts[label], position_map, acts[label])
        paired_errs = remap_positions(c_errs[label], position_map, errs[label])
        error_atp = ((paired_errs - errs[label]) * g_errs[label]).flatten(2).sum(-1)
        grads = g_acts[label][real]
        index, ids, values, grad_values, dropped = _sparsify(acts[label][real], grads, top_k)
        c_index, c_ids, c_values, c_grads, _ = _sparsify(paired_acts[real], grads, top_k)
        assert grad_values is not None and c_grads is not None
        out[label] = SiteCache(
            token_index=index.to(out_device),
            feature_ids=ids.to(out_device),
            activations=values.to(out_device),
            gradients=grad_values.to(out_device),
            error_norm=errs[label][real].flatten(1).norm(dim=-1).to(out_device),
            dropped_mass=dropped.to(out_device),
            n_tokens=n_tokens,
            d_sae=int(sae.cfg.d_sae),
            corrupt=CorruptEntries(
                token_index=c_index.to(out_device),
                feature_ids=c_ids.to(out_device),
                activations=c_values.to(out_device),
                gradients=c_grads.to(out_device),
                error_atp=error_atp[real].to(out_device),
            ),
        )
    return out, position_map.to(real.device)[real].to(out_device)
