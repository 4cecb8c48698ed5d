"""Per-prompt values in shard partials, breakdowns by a prompt field, verification statuses.

No Ray: the pieces a breakdown is made of, and that stores written before
per-prompt values (and magnitude-aware statuses) still read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from circuitscan.schemas.breakdown import MISSING_GROUP, PerPromptArray
from circuitscan.schemas.job_results import AttributionJobResult, NodeVerification
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.breakdown import (
    BreakdownFieldError,
    GroupMeans,
    breakdown_table,
    field_values,
)
from circuitscan.services.jobs.kinds.attribute import status_ratio, verification_status
from circuitscan.services.jobs.kinds.attribute.worker import NodeSums, NodeSumsPartial
from circuitscan.services.jobs.kinds.splice_eval import SplicePartial

RECORDS = [
    PromptRecord(text="a", template="t0", meta={"group": "team"}),
    PromptRecord(text="b", template="t1", meta={"group": "solo"}),
    PromptRecord(text="c", template="t0"),
]


def test_field_values_read_record_fields_and_meta_keys():
    assert field_values(RECORDS, "template") == ["t0", "t1", "t0"]
    assert field_values(RECORDS, "group") == ["team", "solo", MISSING_GROUP]
    assert field_values(RECORDS, "meta.group") == field_values(RECORDS, "group")
    assert field_values(RECORDS, "text") == ["a", "b", "c"]
    with pytest.raises(BreakdownFieldError, match="no prompt of this store has a field 'colour'"):
        field_values(RECORDS, "colour")
    with pytest.raises(BreakdownFieldError, match="carry template, text and meta keys group"):
        field_values(RECORDS, "answer")


def test_group_means_average_defined_values_per_group():
    means = GroupMeans({"estimate": "est", "exact": "ex"})
    labels = ["a", "b", "a", "a"]
    means.prompts(labels)
    means.add("n1", "estimate", labels, np.array([1.0, 2.0, np.nan, 5.0]))
    means.add("n1", "exact", labels, np.array([0.5, np.nan, 1.5, 1.0]))
    out = means.breakdown("attribute", "g", ["n1", "n2"])
    assert [(g.value, g.n_prompts) for g in out.groups] == [("a", 3), ("b", 1)]
    first, second = out.rows
    assert first.cells[0].values == {"estimate": 3.0, "exact": 1.0}
    assert first.cells[0].n_prompts == 2  # the first quantity's defined prompts
    assert first.cells[1].values == {"estimate": 2.0, "exact": None}
    assert second.cells[0].values == {"estimate": None, "exact": None}
    columns, rows = breakdown_table(out)
    assert columns == ["item", "estimate[a]", "exact[a]", "n[a]", "estimate[b]", "exact[b]", "n[b]"]
    assert rows[0] == ("n1", 3.0, 1.0, 2, 2.0, None, 1)


def test_node_sums_keep_per_prompt_values_that_sum_to_the_aggregates_exactly():
    sums = NodeSums(5)
    first = torch.tensor([[0.1, 0.2], [float("nan"), 0.3]], dtype=torch.float64)
    sums.add(["x", "y"], first, ranking=first.abs() * 2, start=0)
    second = torch.tensor([[1 / 3], [2 / 3], [-1.0]], dtype=torch.float64)
    sums.add(["y"], second, start=2)
    part = sums.partial()
    assert part.nodes == ["x", "y"] and part.per_prompt is not None
    assert part.per_prompt.dtype == np.float32 and part.per_prompt.shape == (5, 2)
    assert np.isnan(part.per_prompt[1:, 0]).all()  # x absent on prompt 1 and not in batch 2
    assert np.array_equal(np.nansum(part.per_prompt.astype(np.float64), axis=0), part.node_sum)
    assert part.node_count.tolist() == [1, 5]
    assert part.node_sum[1] == pytest.approx(0.2 + 0.3 + 1 / 3 + 2 / 3 - 1.0, rel=1e-6)
    assert part.node_sum_abs.tolist() == pytest.approx([0.2, 1.0 + 2.0])


def test_partials_of_stores_without_per_prompt_values_still_read():
    arrays = {
        "node_sum": np.array([1.0]),
        "node_sum_abs": np.array([1.0]),
        "node_count": np.array([2]),
    }
    old = NodeSumsPartial.from_outputs(arrays, {"nodes": ["z:L0:0@END"]})
    assert old.per_prompt is None
    written, documents = old.to_outputs()
    assert set(written) == set(arrays) and "per_prompt" not in documents
    splice = SplicePartial.from_outputs({}, {"rows": []})
    assert splice.metric is None and splice.kl is None


@pytest.mark.parametrize(
    ("estimate", "exact", "status"),
    [
        (1.0, 1.0, "confirmed"),
        (1.0, 0.5, "confirmed"),
        (-1.0, -2.0, "confirmed"),
        (1.0, 2.5, "underestimated"),
        (0.0, 0.3, "underestimated"),
        (1.0, 0.4, "overestimated"),
        (0.92, -0.35, "sign_flipped"),
        (1.0, 0.0, "no_effect"),
    ],
)
def test_verification_status_compares_magnitude_and_sign(estimate, exact, status):
    assert verification_status(estimate, exact) == status
    ratio = status_ratio(estimate, exact)
    assert ratio is None if estimate == 0 else ratio == pytest.approx(exact / estimate)


def test_results_written_before_magnitude_statuses_still_read():
    old = {
        "kind": "attribute",
        "job_hash": "h",
        "method": "atp",
        "n_prompts": 4,
        "n_nodes": 1,
        "n_verified": 1,
        "top": [
            {
                "node": "z:L0:0@END",
                "mean": 1.0,
                "mean_abs": 1.0,
                "n_prompts": 4,
                "verification": {
                    "exact_mean": 0.3,
                    "exact_mean_abs": 0.3,
                    "n_prompts": 4,
                    "status": "weaker",
                },
            }
        ],
    }
    result = AttributionJobResult.model_validate_json(json.dumps(old))
    check = result.top[0].verification
    assert isinstance(check, NodeVerification) and check.status == "weaker"
    assert check.ratio is None and result.per_prompt_exact is None


def test_job_arrays_round_trip_and_damage_is_named():
    import circuitscan as cs
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.backends import write_bytes
    from circuitscan.services.store.errors import CorruptResultError
    from circuitscan.services.store.results import read_job_array, write_job_array
    from circuitscan.testing import build_tiny_language_model, build_tiny_sae, write_tiny_store

    model = build_tiny_language_model()
    saes = [build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre"))]
    record = {"text": "When Mary and John went to the store, John gave a drink to"}
    record |= {"answer": " Mary", "wrong": " John"}
    url = write_tiny_store("memory://breakdown-arrays", model, saes, [record])
    store = FeatureStore.open(url)
    values = np.array([[0.5, np.nan], [1.25, -2.0]], dtype=np.float32)
    ref = write_job_array(store, "attribute", "verify_delta", values, ["n1", "n2"])
    assert isinstance(ref, PerPromptArray) and ref.shape == [2, 2] and ref.dtype == "float32"
    np.testing.assert_array_equal(read_job_array(store, ref), values)
    write_bytes(store.backend, ref.key, b"not the array")
    with pytest.raises(CorruptResultError, match=r"verify_delta\.npy\.zst of .* damaged"):
        read_job_array(store, ref)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_delta_is_kept_sparse_and_reads_back_bit_for_bit(mode):
    from circuitscan.services.jobs.kinds.ablation_scan import AblationPartial, ScanInfo

    fill = 0.0 if mode == "zero" else np.nan
    dense = np.full((4, 3), fill, dtype=np.float32)
    dense[0, 1], dense[2, 0], dense[3, 2] = 0.25, -1.5e-7, 3.0
    dense[1, 1] = 0.0  # an ablation measured exactly 0 (kept outside zero mode)
    features = np.array([7, 11, 40], dtype=np.int64)
    scan = ScanInfo(site="L0.z", n_ablations=4, mode=mode)
    part = AblationPartial.from_dense(features, dense, np.arange(4.0), scan)
    assert part.delta is None and part.delta_values is not None
    assert part.delta_values.dtype == np.float32  # the model's dtype: nothing rounded
    assert part.delta_values.shape == ((3,) if mode == "zero" else (4,))
    arrays, documents = part.to_outputs()
    back = AblationPartial.from_outputs(arrays, documents)
    wide = back.dense_delta()
    assert wide.dtype == np.float64
    assert np.array_equal(wide, dense.astype(np.float64), equal_nan=True)
    # float16 / bfloat16 models' values widen exactly; float64 ones stay as they are.
    half = AblationPartial.from_dense(features, dense.astype(np.float16), np.arange(4.0), scan)
    assert half.delta_values is not None and half.delta_values.dtype == np.float32
    double = AblationPartial.from_dense(features, dense.astype(np.float64), np.arange(4.0), scan)
    assert double.delta_values is not None and double.delta_values.dtype == np.float64
    # Shards written with the dense matrix (and no mode) still read as they were.
    old = AblationPartial.from_outputs(
        {"features": features, "delta": dense.astype(np.float64), "baseline": np.arange(4.0)},
        {"scan": {"site": "L0.z", "n_ablations": 4}},
    )
    assert np.array_equal(old.dense_delta(), dense.astype(np.float64), equal_nan=True)
