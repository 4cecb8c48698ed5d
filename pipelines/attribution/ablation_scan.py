"""Feature-ablation scans: exact Δm of ablating every active SAE feature, prompt by prompt.

For every (prompt, feature) pair where the feature is active (> 0) at one of
the chosen positions, the feature is ablated at all chosen positions of that
prompt — set to zero, to its mean over the reference slots, or to a value
resampled from a random reference slot — with the SAE error term kept. The
reference slots are the SAE activations at the chosen positions of the
prompt set itself, or of a separate reference set (:func:`reference_slots`),
which is how a job split into shards keeps one reference for all of them. The model's prefix (everything before the SAE's layer)
runs once per prompt: the residual stream entering the first affected layer
is cached and each ablation row runs only the remaining layers
(``forward(start_at_layer=...)``), many rows per forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution.errors import AttributionInputError, MissingSAEError
from circuitscan.pipelines.attribution.inputs import (
    Answers,
    answer_ids,
    check_answers,
    check_tokens,
)
from circuitscan.pipelines.attribution.positions import (
    UNDEFINED,
    check_aligned,
    check_position_map,
    remap_positions,
    resolve_positions,
)
from circuitscan.pipelines.attribution.recording import Recorder, check_saes, run_recorded
from circuitscan.pipelines.attribution.suffix import start_layer, suffix_metric
from circuitscan.pipelines.sae_decoding import decoder_rows, decodes_linearly
from circuitscan.pipelines.sae_splice import sae_decode, sae_encode
from circuitscan.schemas.attribution import AblationMode, PositionSpec
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec


@dataclass
class ScanResult:
    """Δm (metric units) per prompt and active feature.

    ``delta[p, j]`` is the effect of ablating ``features[j]`` on prompt p;
    pairs where the feature is inactive on the prompt are not run: 0 for
    zero ablation (exactly its effect), NaN for mean/resample.
    """

    site: HookSite
    mode: AblationMode
    features: Int[torch.Tensor, " n_features"]
    delta: Float[torch.Tensor, "n_prompts n_features"]
    baseline: Float[torch.Tensor, " n_prompts"]
    n_ablations: int


@dataclass
class PreparedScan:
    """The once-per-prompt part of a scan: cached residuals, SAE activations, baseline."""

    start_layer: int
    resid: Float[torch.Tensor, "n_prompts seq d_model"]
    acts: Float[torch.Tensor, "n_prompts seq d_sae"]
    site_shape: tuple[int, ...]
    chosen: torch.Tensor  # [n_prompts, seq] bool
    baseline: Float[torch.Tensor, " n_prompts"]


def prepare_scan(
    model: HookedSAETransformer,
    sae: SAE[Any],
    site: HookSite,
    tokens: Int[torch.Tensor, "n_prompts seq"],
    lengths: Int[torch.Tensor, " n_prompts"],
    metric: MetricSpec,
    answer: Int[torch.Tensor, " n_prompts"] | None,
    wrong: Int[torch.Tensor, " n_prompts"] | None,
    positions: Literal["all", "last"] | Sequence[PositionSpec],
    named_positions: Sequence[Mapping[str, int]] | None = None,
    *,
    with_baseline: bool = True,
) -> PreparedScan:
    """One clean forward pass over the prompt set, caching what every ablation row reuses.

    ``with_baseline=False`` leaves the clean metric NaN, for callers that run
    it as unablated rows of their own suffix batches.
    """
    check_saes(model, {site.hook_name: sae})
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    if hook and hook != site.hook_name:
        raise MissingSAEError(
            f"the SAE given reads {hook}, not {site.hook_name}: there is no SAE at {site.label}"
        )
    check_tokens(tokens, lengths, "tokens")
    check_answers(model, tokens.shape[0], metric, answer, wrong)
    start = start_layer(site)
    site_key = ("act", site.hook_name)
    with torch.no_grad():
        rec = Recorder(wanted={site_key})
        # The prefix runs once and no further than the scan needs: up to the
        # site's block, whose input (resid_pre) or output (resid_post) is cached.
        if site.point == "resid_post":
            resid = run_recorded(model, {}, tokens, rec, stop_at_layer=start)
        else:
            resid_key = ("act", HookSite(layer=start, point="resid_pre").hook_name)
            rec.wanted.add(resid_key)
            run_recorded(model, {}, tokens, rec, stop_at_layer=start + 1)
            resid = rec.store[resid_key]
        # The baseline takes the same suffix path as the ablation rows, so an
        # ablation that changes nothing measures exactly 0.
        if with_baseline:
            baseline = suffix_metric(
                model,
                resid,
                start,
                metric,
                lengths=lengths,
                tokens=tokens,
                answer=answer,
                wrong=wrong,
                hooks=[],
            )
        else:
            baseline = torch.full((tokens.shape[0],), float("nan"), dtype=resid.dtype)
        acts = sae_encode(sae, rec.store[site_key])
    if positions == "all":
        specs: list[PositionSpec] = list(range(tokens.shape[1]))
        strict = False
    elif positions == "last":
        specs, strict = ["last"], True
    else:
        specs, strict = list(positions), True
    if not specs:
        raise AttributionInputError("no positions chosen for the ablation scan")
    index = resolve_positions(specs, lengths, named_positions, strict=strict)
    chosen = torch.zeros(tokens.shape, dtype=torch.bool)
    rows = torch.arange(tokens.shape[0])[:, None].expand_as(index)
    defined = index != UNDEFINED
    chosen[rows[defined], index[defined]] = True
    return PreparedScan(
        start_layer=start,
        resid=resid,
        acts=acts,
        site_shape=tuple(rec.store[site_key].shape[2:]),
        chosen=chosen,
        baseline=baseline,
    )


def reference_slots(
    model: HookedSAETransformer,
    sae: SAE[Any],
    site: HookSite,
    tokens: Int[torch.Tensor, "n_prompts seq"],
    lengths: Int[torch.Tensor, " n_prompts"],
    positions: Literal["all", "last"] | Sequence[PositionSpec],
    named_positions: Sequence[Mapping[str, int]] | None = None,
) -> Float[torch.Tensor, "n_slots d_sae"]:
    """SAE activations at the chosen positions of a reference prompt set.

    The pool mean and resample ablations draw from (see ``ablation_scan``'s
    ``reference``); no metric is needed, so reference prompts need no answers.
    """
    prepared = prepare_scan(
        model, sae, site, tokens, lengths, MetricSpec(kind="next_token_loss"), None, None,
        positions, named_positions, with_baseline=False,
    )  # fmt: skip
    return prepared.acts[prepared.chosen]


def corrupted_targets(
    model: HookedSAETransformer,
    sae: SAE[Any],
    site: HookSite,
    prepared: PreparedScan,
    lengths: Int[torch.Tensor, " n_prompts"],
    corrupt_tokens: Int[torch.Tensor, "n_prompts corrupt_seq"],
    corrupt_lengths: Int[torch.Tensor, " n_prompts"],
    position_map: Int[torch.Tensor, "n_prompts seq"] | None = None,
) -> Float[torch.Tensor, "n_prompts seq d_sae"]:
    """The corrupted prompts' SAE activations moved to the clean positions they pair with.

    Position by position (equal token lengths), or through ``position_map``
    (e.g. ``positions.end_aligned_map``); a clean position with no counterpart
    keeps its clean activations, so patching it changes nothing.
    """
    check_tokens(corrupt_tokens, corrupt_lengths, "corrupt_tokens")
    seq = prepared.acts.shape[1]
    if position_map is None:
        check_aligned(lengths.cpu(), corrupt_lengths.cpu())
        steps = torch.arange(seq)[None, :]
        position_map = torch.where(steps < lengths.cpu()[:, None], steps, UNDEFINED)
    else:
        position_map = check_position_map(
            position_map, (lengths.shape[0], seq), lengths.cpu(), corrupt_lengths.cpu()
        )
    site_key = ("act", site.hook_name)
    with torch.no_grad():
        rec = Recorder(wanted={site_key})
        run_recorded(model, {}, corrupt_tokens, rec, stop_at_layer=site.layer + 1)
        acts = sae_encode(sae, rec.store[site_key])
    return remap_positions(acts, position_map, prepared.acts)


def _ablation_values(
    prepared: PreparedScan,
    mode: AblationMode,
    prompt: torch.Tensor,
    feature: torch.Tensor,
    generator: torch.Generator,
    reference: Float[torch.Tensor, "n_slots d_sae"] | None = None,
    target: Float[torch.Tensor, "n_prompts seq d_sae"] | None = None,
) -> Float[torch.Tensor, "rows seq"]:
    """The value each row's feature takes at every position (used where chosen)."""
    rows, seq = prompt.shape[0], prepared.acts.shape[1]
    if mode == "zero":
        return torch.zeros(rows, seq, dtype=prepared.acts.dtype)
    if mode == "corrupted":
        assert target is not None
        return target[prompt[:, None], torch.arange(seq)[None, :], feature[:, None]]
    slots = prepared.acts[prepared.chosen] if reference is None else reference
    if mode == "mean":
        return slots.mean(0)[feature][:, None].expand(rows, seq)
    draw = torch.randint(0, slots.shape[0], (rows, seq), generator=generator)
    return slots[draw, feature[:, None]]


@torch.no_grad()
def ablation_inputs(
    sae: SAE[Any],
    site: HookSite,
    prepared: PreparedScan,
    prompt: Int[torch.Tensor, " rows"],
    feature: Int[torch.Tensor, " rows"],
    values: Float[torch.Tensor, "rows seq"],
) -> tuple[Float[torch.Tensor, "rows seq d_model"], list[tuple[str, Any]]]:
    """The suffix input and hooks of the rows that ablate one feature each (-1: none)."""
    acts = prepared.acts[prompt]
    rows = torch.arange(prompt.shape[0])
    ablates = feature >= 0
    feature = feature.clamp(min=0)
    old = acts[rows[:, None], torch.arange(acts.shape[1])[None, :], feature[:, None]]
    where = prepared.chosen[prompt] & ablates[:, None]
    change = torch.where(where, values - old, torch.zeros_like(old))
    if decodes_linearly(sae):
        direction = decoder_rows(sae, feature).to(prepared.resid.dtype)  # [rows, d_in]
        delta = change[..., None] * direction[:, None, :]
        delta = delta.reshape(*delta.shape[:2], *prepared.site_shape)
    else:
        like = torch.zeros(*acts.shape[:2], *prepared.site_shape, dtype=prepared.resid.dtype)
        edited = acts.clone()
        edited[rows[:, None], torch.arange(acts.shape[1])[None, :], feature[:, None]] = old + change
        delta = sae_decode(sae, edited, like) - sae_decode(sae, acts, like)
    resid = prepared.resid[prompt]
    hooks: list[tuple[str, Any]] = []
    if site.point in ("resid_pre", "resid_post"):
        resid = resid + delta.to(resid.dtype)
    else:
        delta = delta.to(resid.dtype)
        # The suffix may run on fewer positions than were cached (see suffix.py).
        hooks.append((site.hook_name, lambda x, hook=None: x + delta[:, : x.shape[1]]))
    return resid, hooks


def ablation_scan(
    model: HookedSAETransformer,
    sae: SAE[Any],
    site: HookSite,
    tokens: Int[torch.Tensor, "n_prompts seq"],
    lengths: Int[torch.Tensor, " n_prompts"],
    metric: MetricSpec,
    answer: Answers,
    wrong: Answers,
    *,
    mode: AblationMode = "zero",
    positions: Literal["all", "last"] | Sequence[PositionSpec] = "all",
    named_positions: Sequence[Mapping[str, int]] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    reference: Float[torch.Tensor, "n_slots d_sae"] | None = None,
    only: Int[torch.Tensor, " n_only"] | None = None,
    corrupt_tokens: Int[torch.Tensor, "n_prompts corrupt_seq"] | None = None,
    corrupt_lengths: Int[torch.Tensor, " n_prompts"] | None = None,
    position_map: Int[torch.Tensor, "n_prompts seq"] | None = None,
) -> ScanResult:
    """Exact Δm of ablating each active feature at the chosen positions, per prompt.

    ``answer``/``wrong``: token ids, or strings of exactly one token each.
    ``reference``: the slots mean and resample ablations draw from
    (:func:`reference_slots`); default: this prompt set's chosen positions.
    ``only``: ablate just these feature ids (where active), as a targeted scan's
    rounds do; each (prompt, feature) row is the same computation as in the
    full scan, so its Δm is the full scan's. An empty ``only`` measures the
    clean baseline alone.
    ``mode="corrupted"`` patches each feature at the chosen positions to its
    activation on the prompt's corrupted version (``corrupt_tokens``, paired
    position by position or through ``position_map``, see
    :func:`corrupted_targets`); it runs the (prompt, feature) pairs whose
    corrupted value differs from the clean one at a chosen position, and every
    other pair's Δm is exactly 0, as in zero mode.
    """
    if (
        only is not None
        and only.numel()
        and not (int(only.min()) >= 0 and int(only.max()) < int(sae.cfg.d_sae))
    ):
        raise AttributionInputError(
            f"feature ids to ablate must lie in 0..{int(sae.cfg.d_sae) - 1}, "
            f"got {int(only.min())}..{int(only.max())}"
        )
    if reference is not None:
        if reference.ndim != 2 or reference.shape[0] == 0:
            raise AttributionInputError(
                f"reference slots must be a non-empty [n_slots, d_sae] tensor, "
                f"got shape {tuple(reference.shape)}"
            )
        if reference.shape[1] != int(sae.cfg.d_sae):
            raise AttributionInputError(
                f"reference slots have {reference.shape[1]} features, the SAE has {sae.cfg.d_sae}"
            )
    if batch_size < 1:
        raise AttributionInputError(f"batch_size must be positive, got {batch_size}")
    if mode not in ("zero", "mean", "resample", "corrupted"):
        raise AttributionInputError(
            f"unknown ablation mode {mode!r} (zero, mean, resample or corrupted)"
        )
    if (mode == "corrupted") != (corrupt_tokens is not None and corrupt_lengths is not None):
        raise AttributionInputError(
            "corrupted mode patches in the corrupted prompts' activations, so it needs "
            "corrupt_tokens and corrupt_lengths (and only it takes them)"
        )
    answer = answer_ids(model, answer, "answer")
    wrong = answer_ids(model, wrong, "wrong")
    prepared = prepare_scan(
        model, sae, site, tokens, lengths, metric, answer, wrong, positions, named_positions,
        with_baseline=False,
    )  # fmt: skip
    target = None
    if mode == "corrupted":
        assert corrupt_tokens is not None and corrupt_lengths is not None
        target = corrupted_targets(
            model, sae, site, prepared, lengths, corrupt_tokens, corrupt_lengths, position_map
        )
        # A patch to the clean value changes nothing: only pairs that differ are run.
        active = ((target != prepared.acts) & prepared.chosen[..., None]).any(1)
    else:
        active = ((prepared.acts > 0) & prepared.chosen[..., None]).any(1)  # [n_prompts, d_sae]
    if only is not None:
        wanted = torch.zeros(active.shape[1], dtype=torch.bool)
        wanted[only.long()] = True
        active &= wanted
    features = torch.nonzero(active.any(0)).flatten()
    column = torch.full((active.shape[1],), -1, dtype=torch.long)
    column[features] = torch.arange(features.numel())
    pairs = torch.nonzero(active)  # (prompt, feature)
    fill = 0.0 if mode in ("zero", "corrupted") else float("nan")
    delta = torch.full((tokens.shape[0], features.numel()), fill, dtype=prepared.baseline.dtype)
    generator = torch.Generator().manual_seed(seed)
    # The clean baseline rides along as unablated rows (feature -1) at the head
    # of the first batches, instead of costing a suffix pass of its own.
    n_prompts = tokens.shape[0]
    unablated = torch.stack([torch.arange(n_prompts), torch.full((n_prompts,), -1)], dim=1)
    rows_all = torch.cat([unablated, pairs])
    baseline = prepared.baseline.clone()
    for start in range(0, rows_all.shape[0], batch_size):
        prompt, feature = rows_all[start : start + batch_size].T
        values = _ablation_values(
            prepared, mode, prompt, feature.clamp(min=0), generator, reference, target
        )
        resid, hooks = ablation_inputs(sae, site, prepared, prompt, feature, values)
        metric_rows = suffix_metric(
            model,
            resid,
            prepared.start_layer,
            metric,
            lengths=lengths[prompt],
            tokens=tokens[prompt],
            answer=None if answer is None else answer[prompt],
            wrong=None if wrong is None else wrong[prompt],
            hooks=hooks,
        )
        clean = feature < 0
        baseline[prompt[clean]] = metric_rows[clean].to(baseline.dtype)
        ablated = ~clean
        delta[prompt[ablated], column[feature[ablated]]] = (
            metric_rows[ablated] - baseline[prompt[ablated]]
        ).to(delta.dtype)
    return ScanResult(
        site=site,
        mode=mode,
        features=features,
        delta=delta,
        baseline=baseline,
        n_ablations=int(pairs.shape[0]),
    )
