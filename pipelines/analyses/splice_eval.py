"""SAE splice evaluation: does the model still do the task with SAE reconstructions in place?

For each set of sites, one forward pass per variant with every site of the
set intervened on at once; a downstream SAE therefore encodes the activation
that the upstream replacements produced (recomputed sequentially, never
patched from a cached run). Variants, at every real token (optionally not the
BOS position, whose activations are outliers no SAE is trained to keep):

- ``spliced``: activation → SAE reconstruction (the error term zeroed);
- ``error_mean``: activation → reconstruction + the mean SAE error over the
  reference prompts (error mean-ablated rather than zeroed);
- ``mean_ablation``: activation → its mean over the reference prompts (the
  baseline an SAE must beat).

Reference means are per site, over the real tokens of the reference prompts
in an unmodified forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses.linear_parts import AnalysisInputError
from circuitscan.pipelines.metrics import metric_per_prompt, read_positions
from circuitscan.pipelines.sae_splice import (
    SaeArg,
    require_detached,
    sae_reconstruct,
    saes_by_hook,
)
from circuitscan.schemas.analyses import SpliceEvalRow, SpliceVariant
from circuitscan.schemas.hooks import HookSite, block_hook
from circuitscan.schemas.metrics import MetricSpec

VARIANTS: tuple[SpliceVariant, ...] = ("spliced", "error_mean", "mean_ablation")


def _token_mask(lengths: torch.Tensor, seq: int, keep_bos: bool) -> torch.Tensor:
    steps = torch.arange(seq, device=lengths.device)
    mask = steps[None] < lengths[:, None]
    if keep_bos:
        mask &= steps[None] > 0
    return mask


@torch.no_grad()
def reference_means(
    model: HookedSAETransformer,
    saes: SaeArg,
    tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    *,
    keep_bos: bool = True,
    batch_size: int = 32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per hook name: (mean activation, mean SAE error) over the reference prompts' tokens.

    ``saes`` is a sequence of SAEs (each at the hook its config names) or a
    mapping from site label or hook name to SAE.
    """
    require_detached(model, "reference_means", AnalysisInputError)
    by_hook = saes_by_hook(saes)
    sums: dict[str, list[torch.Tensor]] = {}
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        toks = tokens[start : start + batch_size]
        lens = lengths[start : start + batch_size].to(toks.device)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in by_hook)
        mask = _token_mask(lens, toks.shape[1], keep_bos)
        count += int(mask.sum())
        for name, sae in by_hook.items():
            x = cache[name]
            err = x - sae_reconstruct(sae, x)
            act_sum, err_sum = x[mask].sum(0), err[mask].sum(0)
            if name in sums:
                sums[name][0] += act_sum
                sums[name][1] += err_sum
            else:
                sums[name] = [act_sum, err_sum]
    if count == 0:
        raise AnalysisInputError("reference prompts have no tokens to average over")
    return {name: (s[0] / count, s[1] / count) for name, s in sums.items()}


def _hook(
    sae: SAE, variant: SpliceVariant, mean_act: torch.Tensor, mean_err: torch.Tensor,
    mask: torch.Tensor,
) -> Callable[[torch.Tensor, object], torch.Tensor]:  # fmt: skip
    def fn(act: torch.Tensor, hook: object) -> torch.Tensor:
        if variant == "mean_ablation":
            new = mean_act.expand_as(act)
        else:
            new = sae_reconstruct(sae, act)
            if variant == "error_mean":
                new = new + mean_err
        where = mask.reshape(mask.shape + (1,) * (act.dim() - 2))
        return torch.where(where, new.to(act.dtype), act)

    return fn


def _kl(
    clean: Float[torch.Tensor, "... vocab"], other: Float[torch.Tensor, "... vocab"]
) -> torch.Tensor:
    """KL(clean ‖ other) in nats from logits."""
    p_log = clean.log_softmax(-1)
    return (p_log.exp() * (p_log - other.log_softmax(-1))).sum(-1)


@torch.no_grad()
def splice_eval(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    prompts_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Int[torch.Tensor, " batch"] | None,
    wrong: Int[torch.Tensor, " batch"] | None,
    *,
    layer_sets: list[list[str]] | None = None,
    reference_tokens: Int[torch.Tensor, "ref seq2"],
    reference_lengths: Int[torch.Tensor, " ref"],
    keep_bos: bool = True,
    all_positions_kl: bool = True,
    batch_size: int = 16,
) -> list[SpliceEvalRow]:
    """Rows: the clean model, then per site set the variants in ``VARIANTS``.

    ``layer_sets`` lists sets of site labels (``'L6.z'``) or hook names to
    splice together; by default each SAE alone. Prompts are right-padded with
    ``lengths`` real tokens; the metric is ``metric_per_prompt`` (logits for a
    logit difference), KLs are in nats. The model must have no SAEs attached.
    """
    rows, _metric, _kl = splice_eval_values(
        model, saes, prompts_tokens, lengths, metric, answer, wrong,
        layer_sets=layer_sets, reference_tokens=reference_tokens,
        reference_lengths=reference_lengths, keep_bos=keep_bos,
        all_positions_kl=all_positions_kl, batch_size=batch_size,
    )  # fmt: skip
    return rows


def splice_eval_values(
    model: HookedSAETransformer,
    saes: Sequence[SAE],
    prompts_tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    metric: MetricSpec,
    answer: Int[torch.Tensor, " batch"] | None,
    wrong: Int[torch.Tensor, " batch"] | None,
    *,
    layer_sets: list[list[str]] | None = None,
    reference_tokens: Int[torch.Tensor, "ref seq2"],
    reference_lengths: Int[torch.Tensor, " ref"],
    keep_bos: bool = True,
    all_positions_kl: bool = True,
    batch_size: int = 16,
) -> tuple[
    list[SpliceEvalRow], Float[torch.Tensor, "rows batch"], Float[torch.Tensor, "rows batch"]
]:
    """:func:`splice_eval`'s rows, and each row's per-prompt metric and KL at the metric position.

    The two ``[row, prompt]`` float64 tensors are what each row's
    ``metric_mean`` and ``kl_metric_pos`` are the means of (row order as returned).
    """
    require_detached(model, "splice_eval", AnalysisInputError)
    by_name = saes_by_hook(saes)
    label_to_name = {HookSite.from_hook_name(n).label: n for n in by_name}
    sets = layer_sets or [[HookSite.from_hook_name(n).label] for n in by_name]
    resolved: list[list[str]] = []
    for group in sets:
        names = [label_to_name.get(s, s) for s in group]
        missing = [s for s in names if s not in by_name]
        if missing or not names:
            raise AnalysisInputError(f"site set {group} names sites without an SAE: {missing}")
        resolved.append(names)
    device = next(model.parameters()).device
    means = reference_means(
        model, by_name, reference_tokens.to(device), reference_lengths.to(device),
        keep_bos=keep_bos, batch_size=batch_size,
    )  # fmt: skip
    first_layer = {tuple(g): min(HookSite.from_hook_name(n).layer for n in g) for g in resolved}
    prefix_names = {block_hook(layer, "resid_pre") for layer in first_layer.values()}
    # Starting mid-model skips the embedding, so shortformer position embeddings and the
    # attention mask TransformerLens builds for left-padded tokenizers would be lost.
    tokenizer = getattr(model, "tokenizer", None)
    reuse_prefix = model.cfg.positional_embedding_type != "shortformer" and (
        tokenizer is None or getattr(tokenizer, "padding_side", "right") == "right"
    )
    keys: list[tuple[tuple[str, ...], SpliceVariant]] = [((), "clean")]
    keys += [(tuple(group), v) for group in resolved for v in VARIANTS]
    metrics: dict[tuple, list[torch.Tensor]] = {k: [] for k in keys}
    kl_pos: dict[tuple, list[torch.Tensor]] = {k: [] for k in keys}
    kl_all: dict[tuple, list[torch.Tensor]] = {k: [] for k in keys}
    for start in range(0, prompts_tokens.shape[0], batch_size):
        stop = start + batch_size
        toks = prompts_tokens[start:stop].to(device)
        lens = lengths[start:stop].to(device)
        ans = None if answer is None else answer[start:stop].to(device)
        wro = None if wrong is None else wrong[start:stop].to(device)
        mask = _token_mask(lens, toks.shape[1], keep_bos)
        real = _token_mask(lens, toks.shape[1], False)
        pos = read_positions(metric, lens) if metric.kind != "next_token_loss" else lens - 1
        rows = torch.arange(toks.shape[0], device=device)
        clean, prefix = model.run_with_cache(toks, names_filter=lambda n: n in prefix_names)
        for site_names, variant in keys:
            hooks = [
                (n, _hook(by_name[n], variant, means[n][0], means[n][1], mask)) for n in site_names
            ]
            if not site_names:
                logits = clean
            elif not reuse_prefix:
                with model.hooks(fwd_hooks=hooks):
                    logits = model(toks)
            else:
                # Layers before the set's first site see no intervention: start from the
                # clean residual there (same numbers, about half the compute at mid-depth).
                start = first_layer[tuple(site_names)]
                with model.hooks(fwd_hooks=hooks):
                    logits = model(prefix[block_hook(start, "resid_pre")], start_at_layer=start)
            m = metric_per_prompt(logits, metric, lengths=lens, tokens=toks, answer=ans, wrong=wro)
            metrics[(site_names, variant)].append(m.double().cpu())
            kl_pos[(site_names, variant)].append(
                _kl(clean[rows, pos], logits[rows, pos]).double().cpu()
            )
            if all_positions_kl:
                per_tok = _kl(clean, logits) * real
                kl_all[(site_names, variant)].append((per_tok.sum(1) / real.sum(1)).double().cpu())
    table = _rows(keys, metrics, kl_pos, kl_all if all_positions_kl else None)
    per_metric = torch.stack([torch.cat(metrics[key]) for key in keys]).detach()
    per_kl = torch.stack([torch.cat(kl_pos[key]) for key in keys]).detach()
    return table, per_metric, per_kl


def _rows(keys, metrics, kl_pos, kl_all) -> list[SpliceEvalRow]:
    cat = {k: torch.cat(v) for k, v in metrics.items()}
    clean_mean = float(cat[((), "clean")].mean())
    out = []
    for names, variant in keys:
        m = cat[(names, variant)]
        recovered = None
        if names:
            base = float(cat[(names, "mean_ablation")].mean())
            if abs(clean_mean - base) > 1e-12:
                recovered = (float(m.mean()) - base) / (clean_mean - base)
        out.append(
            SpliceEvalRow(
                sites=[HookSite.from_hook_name(n).label for n in names],
                variant=variant,
                n_prompts=int(m.numel()),
                metric_mean=float(m.mean()),
                metric_std=float(m.std()) if m.numel() > 1 else 0.0,
                kl_metric_pos=float(torch.cat(kl_pos[(names, variant)]).mean()),
                kl_all_pos=None
                if kl_all is None
                else float(torch.cat(kl_all[(names, variant)]).mean()),
                metric_recovered=recovered,
            )
        )
    return out
