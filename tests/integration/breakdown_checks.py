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


def check_verified_per_prompt(url: str, exact: np.ndarray) -> None:
    """The stored per-prompt exact Δm of the verified nodes: the pipeline's, and the means'."""
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
