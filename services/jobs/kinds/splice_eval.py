"""The ``splice_eval`` kind: metric and KL with SAE reconstructions spliced in.

Every shard evaluates against the same reference prompts (the job's first
``reference_prompts`` prompts, sent by the driver as context), so the
mean-ablation and mean-error baselines are the same in every shard and the
driver can pool the shards' rows exactly (weighted means; pooled variance).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from circuitscan.schemas.analyses import SpliceEvalRow
from circuitscan.schemas.breakdown import Breakdown
from circuitscan.schemas.job_results import SpliceEvalJobResult
from circuitscan.schemas.jobs import JobSpec, SpliceEvalParams
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.job_kind import (
    ApiView,
    BrowserColumn,
    BrowserView,
    CliView,
    ComputedShard,
    JobKind,
    MergeContext,
    ShardPartial,
)
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.jobs.shard_runner import ShardRunner, tokenize_capped

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from circuitscan.services.reports import Section
    from circuitscan.services.sae_loading import LoadedSAE
    from circuitscan.services.store import FeatureStore


def site_sets(spec: JobSpec, labels: list[str]) -> list[list[str]]:
    """Each SAE alone, then the spec's extra sets (duplicates dropped)."""
    assert isinstance(spec.job, SpliceEvalParams)
    sets: list[list[str]] = [[label] for label in labels]
    for group in spec.job.layer_sets:
        unknown = [label for label in group if label not in labels]
        if unknown:
            raise ValueError(f"splice set {group} names sites without an SAE: {unknown}")
        if group not in sets:
            sets.append(list(group))
    return sets


class SplicePartial(ShardPartial):
    """One shard's splice-evaluation rows (each a mean over the shard's prompts)."""

    rows: list[SpliceEvalRow] = Field(description="clean, then each site set's variants.")
    metric: np.ndarray | None = Field(
        default=None,
        description="[row, prompt] each prompt's metric under each row's variant (float64; a "
        "row's metric_mean is their mean). None in stores written before it was kept.",
    )
    kl: np.ndarray | None = Field(
        default=None,
        description="[row, prompt] KL(original ‖ variant) at the metric position, nats (float64).",
    )


def row_name(row: SpliceEvalRow) -> str:
    """A row as a breakdown names it: ``L1.z spliced`` (``clean`` for the clean model)."""
    return f"{'+'.join(row.sites)} {row.variant}" if row.sites else row.variant


class SpliceEvalRunner(ShardRunner):
    """One shard's splice evaluation rows."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, SpliceEvalParams)
        super().__init__(spec, model)
        self.saes = [loaded.sae for loaded in saes]
        self.sets = site_sets(spec, [loaded.site.label for loaded in saes])

    def compute(
        self, plan: ShardPlan, records: list[PromptRecord], context: list[PromptRecord] | None
    ) -> ComputedShard:
        from circuitscan.pipelines.analyses.splice_eval import splice_eval_values

        if not context:
            raise ValueError("splice_eval shards need the job's reference prompts as context")
        batch = tokenize_capped(self.model, records, self.cap)
        reference = tokenize_capped(self.model, context, self.cap)
        rows, metric, kl = splice_eval_values(
            self.model,
            self.saes,
            batch.tokens,
            batch.lengths,
            self.spec.metric,
            batch.answer,
            batch.wrong,
            layer_sets=self.sets,
            reference_tokens=reference.tokens,
            reference_lengths=reference.lengths,
            batch_size=self.spec.execution.batch_size,
        )
        partial = SplicePartial(rows=list(rows), metric=metric.numpy(), kl=kl.numpy())
        return ComputedShard(batch.token_lists(), partial=partial)


def _pool(rows: list[SpliceEvalRow]) -> SpliceEvalRow:
    """Pool one row's per-shard versions: weighted means, pooled (n−1) standard deviation."""
    n = sum(r.n_prompts for r in rows)
    mean = sum(r.metric_mean * r.n_prompts for r in rows) / n
    squares = sum(
        (r.n_prompts - 1) * r.metric_std**2 + r.n_prompts * r.metric_mean**2 for r in rows
    )
    variance = (squares - n * mean**2) / (n - 1) if n > 1 else 0.0
    kl_all = [r.kl_all_pos for r in rows]
    return rows[0].model_copy(
        update={
            "n_prompts": n,
            "metric_mean": mean,
            "metric_std": math.sqrt(max(variance, 0.0)),
            "kl_metric_pos": sum(r.kl_metric_pos * r.n_prompts for r in rows) / n,
            "kl_all_pos": None
            if any(v is None for v in kl_all)
            else sum(v * r.n_prompts for v, r in zip(kl_all, rows, strict=True)) / n,  # type: ignore[operator]
            "metric_recovered": None,
        }
    )


def splice_result(
    spec: JobSpec, n_prompts: int, reference_prompts: int, partials: Iterable[SplicePartial]
) -> SpliceEvalJobResult:
    by_key: dict[tuple[tuple[str, ...], str], list[SpliceEvalRow]] = defaultdict(list)
    # Where every shard kept its per-prompt values, the job's means are their sums over the
    # job's prompts (so a breakdown's groups add up to them exactly), not pooled shard means.
    sums: dict[tuple[tuple[str, ...], str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    per_prompt = True
    for part in partials:
        per_prompt = per_prompt and part.metric is not None and part.kl is not None
        for i, row in enumerate(part.rows):
            key = (tuple(row.sites), row.variant)
            by_key[key].append(row)
            if per_prompt:
                assert part.metric is not None and part.kl is not None
                sums[key][0] += float(part.metric[i].sum())
                sums[key][1] += float(part.kl[i].sum())
    pooled = {key: _pool(rows) for key, rows in by_key.items()}
    if per_prompt:
        pooled = {
            key: row.model_copy(
                update={
                    "metric_mean": sums[key][0] / row.n_prompts,
                    "kl_metric_pos": sums[key][1] / row.n_prompts,
                }
            )
            for key, row in pooled.items()
        }
    clean = pooled[((), "clean")].metric_mean
    out = []
    for (sites, _variant), row in pooled.items():
        recovered = None
        if sites:
            base = pooled[(sites, "mean_ablation")].metric_mean
            if abs(clean - base) > 1e-12:
                recovered = (row.metric_mean - base) / (clean - base)
        out.append(row.model_copy(update={"metric_recovered": recovered}))
    return SpliceEvalJobResult(
        job_hash=spec.content_hash(),
        n_prompts=n_prompts,
        reference_prompts=reference_prompts,
        rows=out,
    )


def splice_breakdown(
    store: FeatureStore, result: SpliceEvalJobResult, field: str, top: int
) -> Breakdown:
    """Each row's metric and KL averaged per value of a prompt field (per-prompt values)."""
    from circuitscan.services.jobs.breakdown import GroupMeans, grouped_partials, no_per_prompt

    means = GroupMeans(
        {
            "metric": "mean task metric under the variant",
            "kl": "mean KL(original ‖ variant) at the metric position (nats)",
        }
    )
    for _start, groups, part in grouped_partials(store, SplicePartial, field, means):
        if part.metric is None or part.kl is None:
            raise no_per_prompt("splice_eval")
        for i, row in enumerate(part.rows):
            means.add(row_name(row), "metric", groups, part.metric[i])
            means.add(row_name(row), "kl", groups, part.kl[i])
    return means.breakdown("splice_eval", field, [row_name(r) for r in result.rows[:top]])


class SpliceEvalKind(JobKind[SpliceEvalParams, SpliceEvalJobResult]):
    name = "splice_eval"
    params = SpliceEvalParams
    result = SpliceEvalJobResult
    partial = SplicePartial
    api = ApiView(
        path="/splice-eval",
        name="splice_eval",
        summary="Splice evaluation of a splice_eval job (metric, KL per site set)",
    )
    browser = BrowserView(
        query="splice-eval",
        title="splice evaluation · {n_prompts} prompts",
        rows="rows",
        columns=[
            BrowserColumn(name="sites", field="sites", cell="joined"),
            BrowserColumn(name="variant", field="variant"),
            BrowserColumn(name="metric", field="metric_mean", cell="num"),
            BrowserColumn(name="KL at answer", field="kl_metric_pos", cell="num"),
        ],
        breakdown=True,
    )

    def runner(
        self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]
    ) -> ShardRunner:
        return SpliceEvalRunner(spec, model, saes)

    def context(
        self, params: SpliceEvalParams, kept: Sequence[PromptRecord]
    ) -> list[PromptRecord] | None:
        return list(kept[: params.reference_prompts])

    def merge(
        self, params: SpliceEvalParams, partials: Iterable[SplicePartial], ctx: MergeContext
    ) -> SpliceEvalJobResult:
        reference = len(self.context(params, ctx.kept) or [])
        return splice_result(ctx.spec, ctx.n_prompts, reference, partials)

    def breakdown(
        self, store: FeatureStore, result: SpliceEvalJobResult, field: str, top: int
    ) -> Breakdown:
        return splice_breakdown(store, result, field, top)

    def cli_view(self, result: SpliceEvalJobResult, top: int) -> CliView:
        return CliView(
            header=f"splice_eval: {result.n_prompts} prompts, references over "
            f"{result.reference_prompts} prompts",
            columns=["sites", "variant", "metric", "std", "kl_metric_pos", "kl_all", "recovered"],
            rows=[
                (
                    "+".join(r.sites) or "-",
                    r.variant,
                    r.metric_mean,
                    r.metric_std,
                    r.kl_metric_pos,
                    r.kl_all_pos,
                    r.metric_recovered,
                )
                for r in result.rows[:top]
            ],
        )

    def report_section(self, result: SpliceEvalJobResult, plots: Path) -> Section:
        from circuitscan.services.reports import Figure, Section, Table, splice_eval_chart

        chart = splice_eval_chart(
            result.rows, plots / "splice_eval.png", title="SAE splice evaluation"
        )
        rows: list[list[object]] = [
            [
                "+".join(r.sites) or "—",
                r.variant,
                r.metric_mean,
                r.kl_metric_pos,
                r.metric_recovered,
            ]
            for r in result.rows
        ]
        return Section(
            title=f"SAE splice evaluation over {result.n_prompts} prompts",
            paragraphs=[
                "spliced: activation replaced by the SAE reconstruction (error term removed); "
                "mean_ablation: replaced by its mean over the reference prompts.",
            ],
            tables=[Table(["sites", "variant", "metric", "KL (nats)", "recovered"], rows)],
            figures=[Figure(chart, "Task metric and KL per variant.")],
        )
