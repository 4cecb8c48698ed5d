"""Checks of the per-prompt values a job keeps and of its breakdowns, against hand computations.

Called from the job tests in test_jobs.py with the in-process pipelines' own
per-prompt outputs on the same tiny models and prompts, so no extra job runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

import circuitscan as cs
from circuitscan.schemas.breakdown import Breakdown
from circuitscan.services.jobs.job_kind import committed_partials
from circuitscan.services.store import FeatureStore


def group_means(values: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Hand computation: the mean of ``values`` (NaN: undefined) over each label's prompts."""
    out = {}
    labels_array = np.asarray(labels)
    for label in sorted(set(labels)):
        chosen = np.asarray(values, dtype=np.float64)[labels_array == label]
        chosen = chosen[~np.isnan(chosen)]
        out[label] = float(chosen.mean()) if chosen.size else float("nan")
    return out


def assert_cells(
    breakdown: Breakdown, item: str, quantity: str, want: dict[str, float], rel: float = 1e-4
) -> None:
    """The breakdown's ``quantity`` of ``item`` equals the hand means, group by group."""
    row = next(r for r in breakdown.rows if r.item == item)
    got = {cell.group: cell.values[quantity] for cell in row.cells}
    assert set(got) == set(want)
    for group, value in want.items():
        if value != value:
            assert got[group] is None
        else:
            assert got[group] == pytest.approx(value, rel=rel, abs=1e-6), (item, group)


def check_attribute_per_prompt(url: str, estimates: np.ndarray, names: list[str]) -> None:
    """Each shard's per-prompt estimates sum to its stored sums exactly and are the pipeline's."""
    from circuitscan.services.jobs.kinds.attribute.worker import NodeSumsPartial

    store = FeatureStore.open(url)
    rows = []
    column = {name: i for i, name in enumerate(names)}
    for part in committed_partials(store, NodeSumsPartial):
        assert part.per_prompt is not None and part.per_prompt.dtype == np.float32
        wide = part.per_prompt.astype(np.float64)
        assert np.array_equal(np.nansum(wide, axis=0), part.node_sum)
        assert np.array_equal((~np.isnan(part.per_prompt)).sum(axis=0), part.node_count)
        full = np.full((part.per_prompt.shape[0], len(names)), np.nan, dtype=np.float64)
        for i, name in enumerate(part.nodes):
            full[:, column[name]] = wide[:, i]
        rows.append(full)
    stored = np.concatenate(rows)
    np.testing.assert_allclose(stored, estimates, rtol=1e-4, atol=1e-6)


def check_verified_per_prompt(url: str, exact: np.ndarray, shard_size: int) -> None:
    """The stored per-prompt exact Δm of the verified nodes: the pipeline's, and the means'
    (exactly: each verification pass's rows summed in float64, the passes added in order)."""
    from circuitscan.services.store.results import read_job_array, read_result

    result = read_result(url, "attribute")
    ref = result.per_prompt_exact
    assert ref is not None and ref.dtype == "float32"
    stored = read_job_array(url, ref)
    assert stored.shape == (result.n_prompts, len(ref.columns))
    np.testing.assert_allclose(stored, exact, rtol=1e-4, atol=1e-6)
    by_node = {effect.node: effect for effect in result.top}
    for i, name in enumerate(ref.columns):
        check = by_node[name].verification
        assert check is not None
        assert np.nanmean(stored[:, i].astype(np.float64)) == pytest.approx(
            check.exact_mean, rel=1e-12, abs=1e-12
        )
        total, count = 0.0, 0
        for start in range(0, stored.shape[0], shard_size):
            block = stored[start : start + shard_size, i].astype(np.float64)
            total += float(np.nansum(block))
            count += int((~np.isnan(block)).sum())
        assert count == check.n_prompts and total / count == check.exact_mean
        assert check.ratio == pytest.approx(check.exact_mean / by_node[name].mean)


def check_breakdown(
    url: str, by: str, labels: Sequence[str], quantities: dict[str, dict[str, np.ndarray]]
) -> Breakdown:
    """``open_store(url).breakdown(by)`` equals the hand means of per-prompt values.

    ``quantities``: quantity → item → per-prompt values (the pipeline's).
    """
    breakdown = cs.open_store(url).breakdown(by, top=1000)
    assert {g.value: g.n_prompts for g in breakdown.groups} == {
        label: list(labels).count(label) for label in set(labels)
    }
    for quantity, items in quantities.items():
        for item, values in items.items():
            assert_cells(breakdown, item, quantity, group_means(values, labels))
    return breakdown


def check_ablation_per_prompt(url: str) -> None:
    """Each shard keeps its Δm sparse, in the model's dtype, and the job's means are sums of
    exactly those values (in shard order, as the merge adds them)."""
    from circuitscan.services.jobs.kinds.ablation_scan import AblationPartial
    from circuitscan.services.store.results import read_result

    result = read_result(url, "ablation_scan")
    zero = result.mode == "zero"
    totals: dict[int, list[float]] = {}
    for part in committed_partials(FeatureStore.open(url), AblationPartial):
        assert part.delta is None and part.delta_values is not None
        assert part.delta_values.dtype == np.float32  # the tiny Llama computes in float32
        n_stored = part.delta_values.shape[0]
        assert n_stored <= part.scan.n_ablations  # zero mode drops exact zeros
        dense = part.dense_delta()
        assert dense.dtype == np.float64
        assert np.array_equal(
            dense[part.delta_prompts, part.delta_columns], part.delta_values.astype(np.float64)
        )
        values = np.nan_to_num(dense)
        defined = ~np.isnan(dense)
        for column, feature in enumerate(part.features.tolist()):
            slot = totals.setdefault(int(feature), [0.0, 0.0, 0.0])
            slot[0] += float(values[:, column].sum())
            slot[1] += float(np.abs(values[:, column]).sum())
            slot[2] += float(defined[:, column].sum())
    assert {f.feature for f in result.features} == set(totals)
    for f in result.features:
        total, total_abs, n_defined = totals[f.feature]
        n = result.n_prompts if zero else int(n_defined)
        assert f.n_prompts == n
        assert f.mean_delta == total / n and f.mean_abs_delta == total_abs / n


def check_dfa_per_prompt(url: str) -> None:
    """The job's per-feature means are the sums of the shards' per-prompt rows, exactly."""
    from circuitscan.services.jobs.kinds.dfa import DFAPartial
    from circuitscan.services.store.results import dfa_features

    rows: dict[int, list] = {}
    for part in committed_partials(FeatureStore.open(url), DFAPartial):
        for row in part.rows:
            rows.setdefault(row.feature, []).append(row)
    result = dfa_features(url)
    assert {f.feature for f in result.features} == set(rows)
    for feature in result.features:
        mine = rows[feature.feature]
        n = len(mine)
        assert feature.n_prompts == n
        activation = pre = 0.0
        heads = None
        for row in mine:
            activation += row.activation
            pre += row.pre_activation
            per_head = np.asarray(row.contributions, dtype=np.float64).sum(axis=1)
            heads = per_head if heads is None else heads + per_head
        assert heads is not None
        assert feature.mean_activation == activation / n
        assert feature.mean_pre_activation == pre / n
        assert feature.head_means == (heads / n).tolist()


def check_splice_per_prompt(url: str) -> None:
    """Each row's metric and KL means are the sums of the shards' per-prompt values, exactly."""
    from circuitscan.services.jobs.kinds.splice_eval import SplicePartial, row_name
    from circuitscan.services.store.results import splice_eval_rows

    sums: dict[str, list[float]] = {}
    for part in committed_partials(FeatureStore.open(url), SplicePartial):
        assert part.metric is not None and part.kl is not None
        assert part.metric.dtype == np.float64 and part.kl.dtype == np.float64
        for i, row in enumerate(part.rows):
            slot = sums.setdefault(row_name(row), [0.0, 0.0, 0.0])
            slot[0] += float(part.metric[i].sum())
            slot[1] += float(part.kl[i].sum())
            slot[2] += part.metric.shape[1]
    for row in splice_eval_rows(url):
        total, total_kl, n = sums[row_name(row)]
        assert row.n_prompts == n
        assert row.metric_mean == total / n and row.kl_metric_pos == total_kl / n
