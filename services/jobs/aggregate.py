"""Driver side: committed shards' partial results → one job-level result.

Reads only committed (checksum-verified) shards through the results API, so
a result always reflects exactly the manifest. Means are over prompts:
attribution nodes over the prompts where a node exists, ablation deltas over
all prompts in zero mode (an inactive feature's ablation changes nothing)
and over the prompts where the feature was ablated otherwise, DFA features
over the prompts where the feature was decomposed.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from circuitscan.schemas.analyses import SpliceEvalRow
from circuitscan.schemas.job_results import (
    AblationJobResult,
    AttributionJobResult,
    DFAFeatureSummary,
    DFAJobResult,
    FeatureDelta,
    NodeEffect,
    NodeVerification,
    SpliceEvalJobResult,
    VerificationStatus,
)
from circuitscan.schemas.jobs import AblationScanParams, AttributeParams, DFAParams, JobSpec
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import read_shard_outputs


def _shards(store: FeatureStore):
    store.refresh()
    for shard_id in sorted(store.committed_shard_ids()):
        yield read_shard_outputs(store, shard_id)


def attribution_estimates(store: FeatureStore) -> dict[str, tuple[float, float, int]]:
    """Node → (mean, mean |score|, prompts) over every committed shard."""
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for outputs in _shards(store):
        arrays = outputs.arrays
        for i, name in enumerate(outputs.documents["nodes"]):
            slot = total[name]
            slot[0] += float(arrays["node_sum"][i])
            slot[1] += float(arrays["node_sum_abs"][i])
            slot[2] += float(arrays["node_count"][i])
    return {
        name: (s / n, a / n, int(n)) if n else (math.nan, math.nan, 0)
        for name, (s, a, n) in total.items()
    }


def verification_status(estimate: float, exact: float) -> VerificationStatus:
    if exact == 0.0:
        return "no_effect"
    if estimate * exact < 0:
        return "sign_flipped"
    return "confirmed" if abs(exact) >= 0.5 * abs(estimate) else "weaker"


def ranked_nodes(estimates: dict[str, tuple[float, float, int]], k: int) -> list[str]:
    """The k nodes of largest total |score| over the prompt set (ties: by name).

    Ranking by the mean over only the prompts where a node exists would put
    a late position that two long prompts reach above one that every prompt
    has; the total is the mean over all prompts with an absent node counting 0.
    """
    defined = [(name, v) for name, v in estimates.items() if v[2] > 0]
    defined.sort(key=lambda item: (-item[1][1] * item[1][2], item[0]))
    return [name for name, _ in defined[:k]]


def attribution_result(
    spec: JobSpec,
    store: FeatureStore,
    estimates: dict[str, tuple[float, float, int]],
    exact: dict[str, tuple[float, float, int]] | None = None,
) -> AttributionJobResult:
    assert isinstance(spec.job, AttributeParams)
    top = []
    for name in ranked_nodes(estimates, spec.job.top_nodes):
        mean, mean_abs, n = estimates[name]
        check = None
        if exact is not None and name in exact:
            e_mean, e_abs, e_n = exact[name]
            check = NodeVerification(
                exact_mean=e_mean,
                exact_mean_abs=e_abs,
                n_prompts=e_n,
                status=verification_status(mean, e_mean),
            )
        top.append(
            NodeEffect(node=name, mean=mean, mean_abs=mean_abs, n_prompts=n, verification=check)
        )
    return AttributionJobResult(
        job_hash=spec.content_hash(),
        method=spec.job.method,
        n_prompts=store.n_prompts(),
        n_nodes=len(estimates),
        n_verified=len(exact or {}),
        top=top,
    )


def merge_exact(
    parts: list[dict[str, list[float]]], nodes: list[str]
) -> dict[str, tuple[float, float, int]]:
    """Per-shard verification sums (from the workers) → node → (mean, mean |Δm|, prompts)."""
    total = {name: [0.0, 0.0, 0.0] for name in nodes}
    for part in parts:
        for i, name in enumerate(nodes):
            total[name][0] += part["node_sum"][i]
            total[name][1] += part["node_sum_abs"][i]
            total[name][2] += part["node_count"][i]
    return {
        name: (s / n, a / n, int(n)) if n else (math.nan, math.nan, 0)
        for name, (s, a, n) in total.items()
    }


def ablation_result(spec: JobSpec, store: FeatureStore) -> AblationJobResult:
    assert isinstance(spec.job, AblationScanParams)
    zero = spec.job.mode == "zero"
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    n_prompts, n_ablations, baseline, site = 0, 0, 0.0, spec.job.site or ""
    for outputs in _shards(store):
        delta = outputs.arrays["delta"]
        n_prompts += delta.shape[0]
        baseline += float(outputs.arrays["baseline"].sum())
        n_ablations += int(outputs.documents["scan"]["n_ablations"])
        site = outputs.documents["scan"]["site"]
        defined = ~np.isnan(delta)
        values = np.nan_to_num(delta)
        active = (values != 0) if zero else defined
        for column, feature in enumerate(outputs.arrays["features"].tolist()):
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
    spec: JobSpec, store: FeatureStore, reference_prompts: int
) -> SpliceEvalJobResult:
    by_key: dict[tuple[tuple[str, ...], str], list[SpliceEvalRow]] = defaultdict(list)
    for outputs in _shards(store):
        for raw in outputs.documents["rows"]:
            row = SpliceEvalRow.model_validate(raw)
            by_key[(tuple(row.sites), row.variant)].append(row)
    pooled = {key: _pool(rows) for key, rows in by_key.items()}
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
        n_prompts=store.n_prompts(),
        reference_prompts=reference_prompts,
        rows=out,
    )


class _DFASums:
    """Running float64 sums of one feature's DFA rows."""

    def __init__(self) -> None:
        self.n = 0
        self.activation = 0.0
        self.pre = 0.0
        self.bias = 0.0
        self.heads: np.ndarray | None = None
        self.roles: dict[str, float] = defaultdict(float)

    def add(self, row: dict) -> None:
        table = np.asarray(row["contributions"], dtype=np.float64)  # head × source
        self.n += 1
        self.activation += row["activation"]
        self.pre += row["pre_activation"]
        self.bias = row["bias"]
        per_head = table.sum(axis=1)
        self.heads = per_head if self.heads is None else self.heads + per_head
        for role, value in zip(row["roles"], table.sum(axis=0).tolist(), strict=True):
            self.roles[role] += value

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


def dfa_result(spec: JobSpec, store: FeatureStore, site: str) -> DFAJobResult:
    assert isinstance(spec.job, DFAParams)
    sums: dict[int, _DFASums] = defaultdict(_DFASums)
    for outputs in _shards(store):
        for row in outputs.documents["rows"]:
            sums[row["feature"]].add(row)
    order = sorted(sums, key=lambda f: (-sums[f].activation, f))
    return DFAJobResult(
        job_hash=spec.content_hash(),
        site=site,
        position=str(spec.job.position),
        n_prompts=store.n_prompts(),
        features=[sums[feature].summary(feature) for feature in order],
    )
