"""The ``ablation_scan`` kind: exact Δm of ablating every active SAE feature at one site.

Mean and resample ablation values come from the job's reference prompts (its
first ``reference_prompts`` prompts, sent by the driver as context), so every
shard ablates to the same values and the result does not depend on how the
job was cut into shards. A shard stores the features it scanned, the
per-prompt Δm of every (prompt, feature) it ablated and the clean baseline.
Means are over all prompts in zero mode (an inactive feature's ablation
changes nothing) and over the prompts where the feature was ablated otherwise.

The per-prompt Δm is kept sparse: one (prompt, column, value) triple per
entry the dense [prompt, feature] matrix would hold other than its fill (0 in
zero mode, where a feature that did not fire is not ablated and changes
nothing; NaN otherwise). Values keep the dtype the model computed them in
(float32 for float32, float16 and bfloat16 models, float64 for float64), so
nothing is rounded: the dense matrix read back is the computed one bit for
bit, and the job's means are sums of exactly these stored values.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.breakdown import Breakdown
from circuitscan.schemas.job_results import AblationJobResult, FeatureDelta
from circuitscan.schemas.jobs import AblationScanParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.targeted_scan import TargetedScan
from circuitscan.services.jobs.job_kind import (
    ApiPage,
    ApiView,
    BrowserColumn,
    BrowserView,
    CliView,
    ComputedShard,
    JobKind,
    KindCheckError,
    MergeContext,
    ShardPartial,
)
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.jobs.shard_runner import (
    ShardRunner,
    named_positions,
    tokenize_capped,
    tokenize_capped_counting,
)

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from circuitscan.pipelines.batching import TokenBatch
    from circuitscan.services.jobs.worker import WorkerInfo
    from circuitscan.services.reports import Section
    from circuitscan.services.sae_loading import LoadedSAE
    from circuitscan.services.store import FeatureStore


def zero_filled(mode: str | None) -> bool:
    """Whether a pair the scan did not run has Δm exactly 0 (zero: the feature did not fire;
    corrupted: its corrupted value is its clean one), rather than undefined (NaN)."""
    return mode in ("zero", "corrupted")


def scanned_site(spec: JobSpec, labels: list[str]) -> str:
    """The SAE site label an ablation scan runs on (default: the job's first SAE)."""
    assert isinstance(spec.job, AblationScanParams)
    site = spec.job.site or labels[0]
    if site not in labels:
        raise KindCheckError(f"ablation site {site!r} is not one of the job's SAEs {labels}")
    return site


class ScanInfo(BaseModel):
    """Which site a shard scanned and how many ablations it ran."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    site: str = Field(description="SAE site label scanned.")
    n_ablations: int = Field(ge=0, description="(prompt, feature) ablations run in the shard.")
    mode: str | None = Field(
        default=None,
        description="Ablation mode, which fixes the sparse Δm's fill (zero: 0, else NaN); None "
        "in shards written with the dense matrix.",
    )


class AblationPartial(ShardPartial):
    """One shard's scan: the features it ablated and every prompt's Δm for each.

    Shards written before the sparse form hold the dense ``delta``; newer ones
    the ``delta_prompts``/``delta_columns``/``delta_values`` triples (see the
    module docstring). Read either with :meth:`dense_delta`.
    """

    features: np.ndarray = Field(description="[feature] feature ids scanned (int64).")
    delta: np.ndarray | None = Field(
        default=None,
        description="Older shards: [prompt, feature] Δm of the ablation (float64; NaN: not "
        "ablated there).",
    )
    delta_prompts: np.ndarray | None = Field(
        default=None, description="[entry] the shard-local prompt of each stored Δm (int32)."
    )
    delta_columns: np.ndarray | None = Field(
        default=None, description="[entry] its column into ``features`` (int32)."
    )
    delta_values: np.ndarray | None = Field(
        default=None,
        description="[entry] Δm in metric units, in the model's compute dtype (float32 or "
        "float64): exactly the computed value.",
    )
    baseline: np.ndarray = Field(description="[prompt] clean metric (float64).")
    scan: ScanInfo = Field(description="Site and ablation count.")

    @classmethod
    def from_dense(
        cls, features: np.ndarray, delta: np.ndarray, baseline: np.ndarray, scan: ScanInfo
    ) -> AblationPartial:
        """The sparse partial of a dense [prompt, feature] Δm matrix (``scan.mode`` set)."""
        if scan.mode is None:
            raise ValueError("a sparse ablation partial needs its scan's mode")
        if delta.dtype not in (np.float32, np.float64):  # float16/bfloat16 widen exactly
            delta = delta.astype(np.float32)
        # Zero mode: everything but exact zeros (NaN != 0 keeps a NaN); else what is defined.
        keep = delta != 0 if zero_filled(scan.mode) else ~np.isnan(delta)
        prompts, columns = np.nonzero(keep)
        return cls(
            features=features,
            delta_prompts=prompts.astype(np.int32),
            delta_columns=columns.astype(np.int32),
            delta_values=delta[prompts, columns],
            baseline=baseline,
            scan=scan,
        )

    def dense_delta(self) -> np.ndarray:
        """[prompt, feature] Δm as float64 (NaN: not ablated; 0 in zero mode where inactive)."""
        if self.delta is not None:
            return self.delta
        assert self.delta_prompts is not None and self.delta_columns is not None
        assert self.delta_values is not None
        fill = 0.0 if zero_filled(self.scan.mode) else np.nan
        dense = np.full((self.baseline.shape[0], self.features.shape[0]), fill, dtype=np.float64)
        dense[self.delta_prompts, self.delta_columns] = self.delta_values
        return dense


class AblationRunner(ShardRunner):
    """One shard's feature-ablation scan at one SAE site."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, AblationScanParams)
        super().__init__(spec, model)
        self.params = spec.job
        label = scanned_site(spec, [loaded.site.label for loaded in saes])
        self.loaded = next(loaded for loaded in saes if loaded.site.label == label)

    def compute(
        self, plan: ShardPlan, records: list[PromptRecord], context: list[PromptRecord] | None
    ) -> ComputedShard:
        # A targeted scan's shards measure the clean baseline only: its ablations run
        # in rounds chosen by the driver (ablate_features).
        only: list[int] | None = [] if self.params.candidates is not None else None
        token_lists, partial = self._scan(records, context, plan.shard_id, only)
        return ComputedShard(token_lists, partial=partial)

    def ablate_features(
        self, records: list[PromptRecord], features: list[int], shard_id: int
    ) -> AblationPartial:
        """Exact Δm of ablating ``features`` (where active) on one shard's prompts."""
        return self._scan(records, None, shard_id, features)[1]

    def _corrupted(self, records: list[PromptRecord], clean: TokenBatch) -> dict[str, Any]:
        """The corrupted prompts' tokens (and the end-aligned position map) for mode corrupted."""
        from circuitscan.pipelines.attribution.positions import end_aligned_map

        corrupted = [r.model_copy(update={"text": r.corrupted}) for r in records]
        batch = tokenize_capped(self.model, corrupted, self.cap)
        position_map = None
        if self.params.align == "end":
            position_map = end_aligned_map(clean.lengths, batch.lengths, clean.tokens.shape[1])
        return {
            "corrupt_tokens": batch.tokens,
            "corrupt_lengths": batch.lengths,
            "position_map": position_map,
        }

    def _scan(
        self,
        records: list[PromptRecord],
        context: list[PromptRecord] | None,
        seed: int,
        only: list[int] | None,
    ) -> tuple[list[list[int]], AblationPartial]:
        import torch

        from circuitscan.pipelines.attribution import ablation_scan
        from circuitscan.pipelines.attribution.ablation_scan import reference_slots

        batch, removed = tokenize_capped_counting(self.model, records, self.cap)
        positions = self.params.positions
        named = named_positions(records, removed)
        reference = None
        corrupt: dict[str, Any] = {}
        if self.params.mode == "corrupted":
            corrupt = self._corrupted(records, batch)
        elif self.params.mode != "zero":
            if not context:
                raise ValueError(f"{self.params.mode} ablation shards need the reference prompts")
            ref_batch, ref_removed = tokenize_capped_counting(self.model, context, self.cap)
            reference = reference_slots(
                self.model,
                self.loaded.sae,
                self.loaded.site,
                ref_batch.tokens,
                ref_batch.lengths,
                positions if isinstance(positions, str) else list(positions),
                named_positions(context, ref_removed),
            )
        scan = ablation_scan(
            self.model,
            self.loaded.sae,
            self.loaded.site,
            batch.tokens,
            batch.lengths,
            self.spec.metric,
            batch.answer,
            batch.wrong,
            mode=self.params.mode,
            positions=positions if isinstance(positions, str) else list(positions),
            named_positions=named,
            batch_size=self.params.batch_size,
            seed=seed,
            reference=reference,
            only=None if only is None else torch.tensor(only, dtype=torch.long),
            **corrupt,
        )
        delta = scan.delta.detach().cpu()
        if delta.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16
            delta = delta.float()
        partial = AblationPartial.from_dense(
            scan.features.cpu().numpy().astype(np.int64),
            delta.numpy(),
            scan.baseline.detach().cpu().double().numpy(),
            ScanInfo(
                site=self.loaded.site.label, n_ablations=scan.n_ablations, mode=self.params.mode
            ),
        )
        return batch.token_lists(), partial


def ablation_result(spec: JobSpec, partials: Iterable[AblationPartial]) -> AblationJobResult:
    assert isinstance(spec.job, AblationScanParams)
    zero = zero_filled(spec.job.mode)
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    n_prompts, n_ablations, baseline, site = 0, 0, 0.0, spec.job.site or ""
    for part in partials:
        delta = part.dense_delta()
        n_prompts += delta.shape[0]
        baseline += float(part.baseline.sum())
        n_ablations += part.scan.n_ablations
        site = part.scan.site
        defined = ~np.isnan(delta)
        values = np.nan_to_num(delta)
        active = (values != 0) if zero else defined
        for column, feature in enumerate(part.features.tolist()):
            slot = sums[int(feature)]
            slot[0] += float(values[:, column].sum())
            slot[1] += float(np.abs(values[:, column]).sum())
            slot[2] += float(defined[:, column].sum())
            slot[3] += float(active[:, column].sum())
    features = []
    for feature, (total, total_abs, defined_n, active_n) in sums.items():
        n = n_prompts if zero else int(defined_n)
        features.append(
            FeatureDelta(
                site=site,
                feature=feature,
                mean_delta=total / n if n else math.nan,
                mean_abs_delta=total_abs / n if n else math.nan,
                n_prompts=n,
                n_active=int(active_n),
            )
        )
    features.sort(key=lambda f: (-f.mean_abs_delta, f.feature))
    return AblationJobResult(
        job_hash=spec.content_hash(),
        site=site,
        mode=spec.job.mode,
        n_prompts=n_prompts,
        n_ablations=n_ablations,
        baseline_mean=baseline / n_prompts if n_prompts else math.nan,
        features=features,
    )


def ablation_breakdown(
    store: FeatureStore, result: AblationJobResult, field: str, top: int
) -> Breakdown:
    """The first ``top`` features' Δm averaged per value of a prompt field.

    From the shards' per-prompt Δm (the same values ``ablation_result``
    sums): in zero mode over every prompt of the group (an inactive feature's
    Δm is 0), otherwise over the group's prompts where the feature was ablated.
    """
    from circuitscan.services.jobs.breakdown import GroupMeans, grouped_partials

    zero = zero_filled(result.mode)
    features = [f.feature for f in result.features[:top]]
    means = GroupMeans(
        {
            "delta": "mean Δm of ablating the feature (metric units)",
            "abs_delta": "mean |Δm| (metric units)",
            "baseline": "mean clean metric of the group's prompts",
        }
    )
    for _start, groups, part in grouped_partials(store, AblationPartial, field, means):
        delta = np.nan_to_num(part.dense_delta()) if zero else part.dense_delta()
        columns = {int(feature): c for c, feature in enumerate(part.features.tolist())}
        for feature in features:
            if feature in columns:
                values = delta[:, columns[feature]]
            elif zero:  # inactive on every prompt of the shard: ablating it changes nothing
                values = np.zeros(len(groups))
            else:
                continue
            means.add(str(feature), "delta", groups, values)
            means.add(str(feature), "abs_delta", groups, np.abs(values))
            means.add(str(feature), "baseline", groups, part.baseline)
    return means.breakdown("ablation_scan", field, [str(f) for f in features])


class AblationResults(ApiPage):
    """A page of an ablation scan's per-feature effects, with the scan's summary."""

    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    site: str = Field(description="SAE site label scanned.")
    mode: str = Field(description="Ablation value: zero, mean or resample.")
    n_prompts: int = Field(description="Prompts scanned.")
    baseline_mean: float = Field(description="Mean clean metric over the prompts.")
    offset: int = Field(description="Rank of the first feature of this page.")
    limit: int = Field(description="Page size asked for.")
    total: int = Field(description="Features scanned.")
    features: list[FeatureDelta] = Field(description="Features by mean |Δm|, largest first.")
    targeted: TargetedScan | None = Field(
        default=None, description="A targeted scan's candidates and stop (None: a full scan)."
    )


class AblationScanKind(JobKind[AblationScanParams, AblationJobResult]):
    name = "ablation_scan"
    params = AblationScanParams
    result = AblationJobResult
    partial = AblationPartial
    api = ApiView(
        path="/ablation",
        name="ablation",
        summary="Per-feature effects of an ablation_scan job",
        page=AblationResults,
        rows_from="features",
        rows_to="features",
    )
    browser = BrowserView(
        query="ablation?limit=20",
        title="ablation scan ({mode}) at {site} · {n_prompts} prompts · baseline {baseline_mean:num}",
        rows="features",
        columns=[
            BrowserColumn(name="feature", field="feature"),
            BrowserColumn(name="mean Δ", field="mean_delta", cell="num"),
            BrowserColumn(name="mean |Δ|", field="mean_abs_delta", cell="num"),
            BrowserColumn(name="active", field="n_active", cell="ratio", over="n_prompts"),
            # Targeted scans: the cache's linear estimate beside the exact value.
            BrowserColumn(name="estimate |Δ|", field="estimate_mean_abs", cell="num"),
            # Pair-level targeted scans: how many of the feature's pairs are exact.
            BrowserColumn(name="exact pairs", field="n_exact", cell="ratio", over="n_active"),
        ],
        breakdown=True,
    )

    def runner(
        self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]
    ) -> ShardRunner:
        return AblationRunner(spec, model, saes)

    def check_sites(self, spec: JobSpec, info: WorkerInfo) -> str | None:
        site = scanned_site(spec, list(info.sae_hooks))
        if isinstance(spec.job, AblationScanParams) and spec.job.candidates is not None:
            from circuitscan.services.jobs.kinds.targeted_scan import check_cache

            check_cache(spec, site, info.sae_fingerprints.get(site, ""), info.model_fingerprint)
        return site

    def check_prompts(self, params: AblationScanParams, records: list[PromptRecord]) -> None:
        if params.mode == "corrupted":
            missing = [i for i, r in enumerate(records) if r.corrupted is None]
            if missing:
                raise KindCheckError(
                    f"mode: corrupted patches in each prompt's corrupted version; {len(missing)} "
                    f"of {len(records)} prompts have none (first: prompt {missing[0]})"
                )
        if params.candidates is not None:
            from circuitscan.services.jobs.kinds.targeted_scan import check_cache_prompts

            check_cache_prompts(params.candidates, records, params.mode == "corrupted")

    def position_names(self, params: AblationScanParams) -> list[str]:
        if isinstance(params.positions, list):
            return [name for name in params.positions if name != "last"]
        return []

    def context(
        self, params: AblationScanParams, kept: Sequence[PromptRecord]
    ) -> list[PromptRecord] | None:
        if zero_filled(params.mode):  # no reference values: zero, or each prompt's own corruption
            return None
        return list(kept[: params.reference_prompts])

    def merge(
        self, params: AblationScanParams, partials: Iterable[AblationPartial], ctx: MergeContext
    ) -> AblationJobResult:
        if params.candidates is not None:
            from circuitscan.services.jobs.kinds.targeted_scan import targeted_result

            return targeted_result(params, ctx, list(partials))
        return ablation_result(ctx.spec, partials)

    def breakdown(
        self, store: FeatureStore, result: AblationJobResult, field: str, top: int
    ) -> Breakdown:
        return ablation_breakdown(store, result, field, top)

    def cli_view(self, result: AblationJobResult, top: int) -> CliView:
        if result.targeted is not None:
            from circuitscan.services.jobs.kinds.targeted_views import targeted_cli_view

            return targeted_cli_view(result, top)
        return CliView(
            header=f"ablation_scan ({result.mode}) at {result.site}: {result.n_prompts} prompts, "
            f"{result.n_ablations} ablations, baseline metric {result.baseline_mean:.4g}",
            columns=["feature", "mean_delta", "mean_abs", "prompts", "active"],
            rows=[
                (f.feature, f.mean_delta, f.mean_abs_delta, f.n_prompts, f.n_active)
                for f in result.features[:top]
            ],
        )

    def report_section(self, result: AblationJobResult, plots: Path) -> Section:
        from circuitscan.services.reports import Figure, Section, Table, attribution_bars

        top = result.features[:25]
        bars = attribution_bars(
            [f"{result.site} #{f.feature}" for f in top],
            [f.mean_delta for f in top],
            plots / "ablation_deltas.png",
            title=f"{result.mode}-ablation of each active feature ({result.site})",
            xlabel="mean Δ logit difference",
        )
        rows: list[list[object]] = [
            [f.feature, f.mean_delta, f.mean_abs_delta, f.n_active, f.n_prompts] for f in top
        ]
        if result.targeted is not None:
            from circuitscan.services.jobs.kinds.targeted_views import exact_cell, targeted_line

            rows = [
                [*row, f.estimate_mean_abs, exact_cell(f)] for row, f in zip(rows, top, strict=True)
            ]
            return Section(
                title=f"Targeted feature ablation scan ({result.site}, {result.mode})",
                paragraphs=[
                    f"{result.n_ablations} exact ablations over {result.n_prompts} prompts; "
                    f"clean mean logit difference {result.baseline_mean:.3f}.",
                    targeted_line(result.targeted),
                ],
                tables=[
                    Table(
                        [
                            "feature",
                            "mean Δ",
                            "mean |Δ|",
                            "active on",
                            "prompts",
                            "estimate |Δ|",
                            "exact pairs",
                        ],
                        rows,
                    )
                ],
                figures=[Figure(bars, "Largest mean |Δ| first.")],
            )
        return Section(
            title=f"Feature ablation scan ({result.site}, {result.mode})",
            paragraphs=[
                f"{result.n_ablations} exact ablations over {result.n_prompts} prompts; "
                f"clean mean logit difference {result.baseline_mean:.3f}.",
            ],
            tables=[Table(["feature", "mean Δ", "mean |Δ|", "active on", "prompts"], rows)],
            figures=[Figure(bars, "Largest mean |Δ| first.")],
        )
