"""The ``dfa`` kind: hook_z SAE features split by head and source position, per prompt.

A shard stores one row per (prompt, feature): the feature's pre-activation,
activation, constant part and its full [head][source] table, with each
source position's role (named position, 'dest', 'BOS' or 'other'), so the
driver's averages by head and by role (over the prompts where the feature
was decomposed) are exact whatever the sharding, and a reader can still
open any single prompt's table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.breakdown import Breakdown
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.job_results import DFAFeatureSummary, DFAJobResult
from circuitscan.schemas.jobs import DFAParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
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
    tokenize_capped_counting,
)

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from circuitscan.pipelines.batching import TokenBatch
    from circuitscan.services.jobs.worker import WorkerInfo
    from circuitscan.services.reports import Section
    from circuitscan.services.sae_loading import LoadedSAE
    from circuitscan.services.store import FeatureStore


class DFAJobError(KindCheckError):
    """A DFA job cannot run as specified (no hook_z SAE, a position a prompt lacks)."""


def dfa_site(params: DFAParams, sites: list[HookSite]) -> HookSite:
    """The hook_z site the job decomposes: the one named, else the first z SAE of the job."""
    z_sites = [site for site in sites if site.point == "z"]
    if params.site is not None:
        wanted = HookSite.parse(params.site)
        if wanted not in sites:
            raise DFAJobError(
                f"dfa site {wanted.label} has no SAE in this job (SAEs at "
                f"{[site.label for site in sites]})"
            )
        return wanted
    if not z_sites:
        raise DFAJobError(
            f"dfa jobs need an attention-output (hook_z) SAE; this job's SAEs are at "
            f"{[site.label for site in sites]}"
        )
    return z_sites[0]


def destination(
    position: str | int, length: int, named: Mapping[str, int] | None, prompt: int
) -> int:
    """The destination token index of one prompt of ``length`` real tokens (BOS included)."""
    if position == "last":
        return length - 1
    if isinstance(position, int):
        if position >= length:
            raise DFAJobError(
                f"dfa position {position} is outside prompt {prompt} ({length} tokens with BOS)"
            )
        return position
    if not named or position not in named:
        have = sorted(named) if named else []
        raise DFAJobError(
            f"prompt {prompt} has no named position {position!r} (it has {have or 'none'})"
        )
    return named[position]


# Shards written before the BOS role had its name called it "first".
_ROLE_NAMES = {"first": "BOS"}


def _role(name: str) -> str:
    return _ROLE_NAMES.get(name, name)


def source_roles(dest: int, named: Mapping[str, int] | None) -> list[str]:
    """The role of every source position 0..dest, for averaging across prompts of other lengths."""
    roles = ["other"] * (dest + 1)
    roles[0] = "BOS"
    roles[dest] = "dest"
    for name, at in (named or {}).items():
        if at <= dest:
            roles[at] = name
    return roles


class DFARow(BaseModel):
    """One feature's decomposition on one prompt."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt: int = Field(ge=0, description="Prompt index in the job.")
    dest_pos: int = Field(ge=0, description="Destination token index (BOS is 0).")
    feature: int = Field(ge=0, description="SAE feature index.")
    activation: float = Field(description="Feature activation at the destination.")
    pre_activation: float = Field(description="Encoder pre-activation (SAE units).")
    bias: float = Field(description="The input-independent part b_enc − b_dec·W_enc.")
    contributions: list[list[float]] = Field(
        description="[head][source 0..dest_pos] contribution to the pre-activation "
        "(sources after the destination are masked, always 0, and not stored)."
    )
    roles: list[str] = Field(description="[source] the role of each source position.")
    chosen_by: str | None = Field(
        default=None,
        description="How the feature was chosen on this prompt: by_attribution, by_activation "
        "or given (None in stores written before the choice was recorded).",
    )


class DFAPartial(ShardPartial):
    """One shard's DFA rows, in prompt order."""

    rows: list[DFARow] = Field(description="One row per (prompt, feature decomposed).")


class DFARunner(ShardRunner):
    """One shard's DFA rows."""

    def __init__(self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]):
        assert isinstance(spec.job, DFAParams)
        super().__init__(spec, model)
        self.params = spec.job
        self.site = dfa_site(self.params, [loaded.site for loaded in saes])
        self.saes = [loaded.sae for loaded in saes]

    def compute(
        self, plan: ShardPlan, records: list[PromptRecord], context: list[PromptRecord] | None
    ) -> ComputedShard:
        from circuitscan.pipelines.analyses.dfa import dfa_features

        batch, removed = tokenize_capped_counting(self.model, records, self.cap)
        named = named_positions(records, removed)
        dests = []
        for index in range(len(records)):
            where = None if named is None else named[index]
            length = int(batch.lengths[index])
            dests.append(destination(self.params.position, length, where, plan.start + index))
        by_attribution = self._attributed(records, batch, dests)
        rows: list[DFARow] = []
        for index in range(len(records)):
            length = int(batch.lengths[index])
            where = None if named is None else named[index]
            prompt = plan.start + index
            dest = dests[index]
            chosen_by, features = "given", self.params.features
            if not isinstance(features, list):
                chosen_by = "by_attribution" if index in by_attribution else "by_activation"
                features = by_attribution.get(index)
            results = dfa_features(
                self.model,
                self.saes,
                batch.tokens[index, :length],
                self.site.layer,
                dest,
                features=features,
                top=self.params.top_features,
            )
            roles = source_roles(dest, where)
            for result in results:
                rows.append(
                    DFARow(
                        prompt=prompt,
                        dest_pos=dest,
                        feature=result.feature,
                        activation=result.activation,
                        pre_activation=result.pre_activation,
                        bias=result.bias,
                        contributions=[row[: dest + 1] for row in result.contributions],
                        roles=roles,
                        chosen_by=chosen_by,
                    )
                )
        return ComputedShard(batch.token_lists(), partial=DFAPartial(rows=rows))

    def _attributed(
        self, records: list[PromptRecord], batch: TokenBatch, dests: list[int]
    ) -> dict[int, list[int]]:
        """Prompt index → its top_features features by |activation × gradient| at the
        destination, for the prompts whose features are chosen by attribution."""
        wanted = self.params.features
        if isinstance(wanted, list) or wanted == "by_activation":
            return {}
        labelled = [i for i, record in enumerate(records) if has_metric_labels(self.spec, record)]
        if wanted == "by_attribution" and len(labelled) < len(records):
            missing = next(i for i in range(len(records)) if i not in labelled)
            raise DFAJobError(
                f"dfa features: by_attribution needs the metric's labels on every prompt; "
                f"prompt {missing} lacks them"
            )
        if not labelled:
            return {}
        return top_attributed(
            self.model,
            self.saes,
            self.site.label,
            batch.tokens[labelled],
            batch.lengths[labelled],
            self.spec.metric,
            None if batch.answer is None else batch.answer[labelled],
            None if batch.wrong is None else batch.wrong[labelled],
            [dests[i] for i in labelled],
            self.params.top_features,
            keys=labelled,
        )


def has_metric_labels(spec: JobSpec, record: PromptRecord) -> bool:
    """Whether the job's metric can be evaluated on the prompt (its answer / wrong tokens)."""
    kind = spec.metric.kind
    if kind == "next_token_loss":
        return True
    if kind == "logit_diff":
        return record.answer is not None and record.wrong is not None
    return record.answer is not None


def top_attributed(
    model: HookedSAETransformer,
    saes: list[Any],
    label: str,
    tokens: Any,
    lengths: Any,
    metric: Any,
    answer: Any,
    wrong: Any,
    dests: list[int],
    top: int,
    *,
    keys: list[int],
) -> dict[int, list[int]]:
    """keys[i] → the ``top`` features of site ``label`` with the largest |a · ∂m/∂a| at
    ``dests[i]`` of prompt i (nonzero attributions only), from one cache pass with gradients."""
    import torch

    from circuitscan.pipelines.caching import cache_batch

    site = cache_batch(
        model, saes, tokens, lengths, metric, answer=answer, wrong=wrong, gradients=True
    )[label]
    assert site.gradients is not None
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cpu().long().cumsum(0)[:-1]])
    out = {}
    for i, key in enumerate(keys):
        at = site.token_index == int(starts[i]) + dests[i]
        scores = (site.activations[at] * site.gradients[at]).abs()
        ids = site.feature_ids[at]
        order = torch.argsort(scores, descending=True, stable=True)[:top]
        out[key] = [int(ids[j]) for j in order.tolist() if float(scores[j]) > 0]
    return out


class _DFASums:
    """Running float64 sums of one feature's DFA rows."""

    def __init__(self) -> None:
        self.n = 0
        self.activation = 0.0
        self.pre = 0.0
        self.bias = 0.0
        self.heads: np.ndarray | None = None
        self.roles: dict[str, float] = defaultdict(float)

    def add(self, row: DFARow) -> None:
        table = np.asarray(row.contributions, dtype=np.float64)  # head × source
        self.n += 1
        self.activation += row.activation
        self.pre += row.pre_activation
        self.bias = row.bias
        per_head = table.sum(axis=1)
        self.heads = per_head if self.heads is None else self.heads + per_head
        for role, value in zip(row.roles, table.sum(axis=0).tolist(), strict=True):
            self.roles[_role(role)] += value

    def summary(self, feature: int) -> DFAFeatureSummary:
        assert self.heads is not None
        return DFAFeatureSummary(
            feature=feature,
            n_prompts=self.n,
            mean_activation=self.activation / self.n,
            mean_pre_activation=self.pre / self.n,
            bias=self.bias,
            head_means=(self.heads / self.n).tolist(),
            source_means={role: value / self.n for role, value in self.roles.items()},
        )


def dfa_breakdown(store: FeatureStore, result: DFAJobResult, field: str, top: int) -> Breakdown:
    """The first ``top`` features' activation and parts by source role, per group of prompts.

    Means over the group's prompts where the feature was decomposed (a role a
    prompt lacks counts 0 there, as in the job's own means).
    """
    from circuitscan.services.jobs.breakdown import GroupMeans, grouped_partials

    features = [f.feature for f in result.features[:top]]
    wanted = set(features)
    roles = sorted({role for f in result.features[:top] for role in f.source_means})
    quantities = {
        "activation": "mean feature activation at the destination",
        "pre_activation": "mean encoder pre-activation (SAE units)",
    } | {f"from:{role}": f"mean contribution of the {role} source (all heads)" for role in roles}
    means = GroupMeans(quantities)
    for start, groups, part in grouped_partials(store, DFAPartial, field, means):
        for row in part.rows:
            if row.feature not in wanted:
                continue
            label = [groups[row.prompt - start]]
            item = str(row.feature)
            means.add(item, "activation", label, np.array([row.activation]))
            means.add(item, "pre_activation", label, np.array([row.pre_activation]))
            by_role: dict[str, float] = dict.fromkeys(roles, 0.0)
            table = np.asarray(row.contributions, dtype=np.float64)
            for role, value in zip(row.roles, table.sum(axis=0).tolist(), strict=True):
                by_role[_role(role)] = by_role.get(_role(role), 0.0) + value
            for role in roles:
                means.add(item, f"from:{role}", label, np.array([by_role[role]]))
    return means.breakdown("dfa", field, [str(f) for f in features])


class DFAResults(ApiPage):
    """A page of a DFA job's features, with the job's summary."""

    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    site: str = Field(description="hook_z SAE site label.")
    position: str = Field(description="Destination position as the job named it.")
    n_prompts: int = Field(description="Prompts analysed.")
    offset: int = Field(description="Rank of the first feature of this page.")
    limit: int = Field(description="Page size asked for.")
    total: int = Field(description="Features decomposed.")
    features: list[DFAFeatureSummary] = Field(
        description="Features by total activation, largest first; contributions by head and "
        "by source role."
    )


def _largest(values: dict[str, float], n: int = 3) -> str:
    """The ``n`` entries of largest magnitude, as 'name +1.23'."""
    best = sorted(values.items(), key=lambda item: -abs(item[1]))[:n]
    return ", ".join(f"{name} {value:+.3g}" for name, value in best)


class DFAKind(JobKind[DFAParams, DFAJobResult]):
    name = "dfa"
    params = DFAParams
    result = DFAJobResult
    partial = DFAPartial
    api = ApiView(
        path="/dfa",
        name="dfa",
        summary="Features of a dfa job split by head and by source role",
        page=DFAResults,
        rows_from="features",
        rows_to="features",
    )
    browser = BrowserView(
        query="dfa?limit=20",
        title="DFA at {site}, position {position} · {n_prompts} prompts",
        rows="features",
        columns=[
            BrowserColumn(name="feature", field="feature"),
            BrowserColumn(name="mean activation", field="mean_activation", cell="num"),
            BrowserColumn(name="top head", field="head_means", cell="largest_index", prefix="h"),
            BrowserColumn(name="top source", field="source_means", cell="largest_entry"),
        ],
        breakdown=True,
    )

    def runner(
        self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]
    ) -> ShardRunner:
        return DFARunner(spec, model, saes)

    def reads_metric(self, params: DFAParams) -> bool:
        return False

    def check_sites(self, spec: JobSpec, info: WorkerInfo) -> str | None:
        assert isinstance(spec.job, DFAParams)
        site = dfa_site(spec.job, [HookSite.parse(label) for label in info.sae_hooks]).label
        width = info.sae_widths[site]
        given = spec.job.features if isinstance(spec.job.features, list) else []
        too_big = [f for f in given if f >= width]
        if too_big:
            raise DFAJobError(f"dfa features {too_big} out of range: the {site} SAE has {width}")
        return site

    def position_names(self, params: DFAParams) -> list[str]:
        position = params.position
        return [position] if isinstance(position, str) and position != "last" else []

    def merge(
        self, params: DFAParams, partials: Iterable[DFAPartial], ctx: MergeContext
    ) -> DFAJobResult:
        assert ctx.site is not None
        sums: dict[int, _DFASums] = defaultdict(_DFASums)
        chosen_by: set[str] = set()
        for part in partials:
            for row in part.rows:
                sums[row.feature].add(row)
                if row.chosen_by is not None:
                    chosen_by.add(row.chosen_by)
        order = sorted(sums, key=lambda f: (-sums[f].activation, f))
        return DFAJobResult(
            job_hash=ctx.spec.content_hash(),
            site=ctx.site,
            position=str(params.position),
            n_prompts=ctx.n_prompts,
            features=[sums[feature].summary(feature) for feature in order],
            features_by="+".join(sorted(chosen_by)) or None,
        )

    def breakdown(
        self, store: FeatureStore, result: DFAJobResult, field: str, top: int
    ) -> Breakdown:
        return dfa_breakdown(store, result, field, top)

    def cli_view(self, result: DFAJobResult, top: int) -> CliView:
        return CliView(
            header=f"dfa at {result.site}, position {result.position}: {result.n_prompts} "
            f"prompts, {len(result.features)} features"
            + (f" chosen {result.features_by}" if result.features_by else "")
            + " (mean contributions, SAE pre-activation units)",
            columns=["feature", "prompts", "activation", "pre_act", "top heads", "top sources"],
            rows=[
                (
                    f.feature,
                    f.n_prompts,
                    f.mean_activation,
                    f.mean_pre_activation,
                    _largest({f"H{h}": v for h, v in enumerate(f.head_means)}),
                    _largest(f.source_means),
                )
                for f in result.features[:top]
            ],
        )

    def report_section(self, result: DFAJobResult, plots: Path) -> Section:
        """The most active feature's split by head and by source role, and every feature's summary."""
        from circuitscan.services.reports import Figure, Section, Table, attribution_bars

        figures = []
        if result.features:
            top = result.features[0]
            parts = {f"head {h}": v for h, v in enumerate(top.head_means)}
            parts |= {f"from {role}": v for role, v in top.source_means.items()}
            bars = attribution_bars(
                list(parts),
                list(parts.values()),
                plots / "dfa_top_feature.png",
                title=f"DFA of {result.site} #{top.feature} at {result.position}",
                xlabel="mean contribution to the pre-activation (SAE units)",
            )
            caption = (
                "By head (all sources) and by source role (all heads); each set plus the "
                f"constant {top.bias:.3g} sums to the mean pre-activation."
            )
            figures.append(Figure(bars, caption))
        rows: list[list[object]] = []
        for feature in result.features[:25]:
            head = max(range(len(feature.head_means)), key=lambda h: abs(feature.head_means[h]))
            role = max(feature.source_means, key=lambda r: abs(feature.source_means[r]))
            rows.append(
                [
                    feature.feature,
                    feature.n_prompts,
                    feature.mean_activation,
                    feature.mean_pre_activation,
                    f"{head} ({feature.head_means[head]:+.3g})",
                    f"{role} ({feature.source_means[role]:+.3g})",
                ]
            )
        return Section(
            title=f"Direct feature attribution ({result.site} at {result.position})",
            paragraphs=[
                f"{len(result.features)} features decomposed over {result.n_prompts} prompts, "
                "attention patterns and norm scales frozen (exact).",
            ],
            tables=[
                Table(
                    ["feature", "prompts", "activation", "pre-act", "top head", "top source"], rows
                )
            ],
            figures=figures,
        )
