"""The job-kind registry: one table every consumer reads, typed shard partials, the stored layout.

A store written before the partials were typed (raw arrays and JSON
documents under each shard's prefix) must read back into the same partials,
and a partial written now must lay out exactly those keys.
"""

from __future__ import annotations

import math
import subprocess
import sys
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from circuitscan.schemas.analyses import SpliceEvalRow
from circuitscan.schemas.job_results import AttributionJobResult, JobResult
from circuitscan.schemas.jobs import (
    AblationScanParams,
    AttributeParams,
    DFAParams,
    IOISource,
    JobParams,
    JobSpec,
)
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import StoreLayout
from circuitscan.services.jobs.job_kind import MergeContext, ShardPartial, committed_partials
from circuitscan.services.jobs.kinds import JOB_KINDS, job_kind
from circuitscan.services.jobs.kinds.ablation_scan import AblationPartial, ScanInfo
from circuitscan.services.jobs.kinds.attribute.worker import NodeSumsPartial
from circuitscan.services.jobs.kinds.dfa import DFAPartial, DFARow
from circuitscan.services.jobs.kinds.splice_eval import SplicePartial
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.backends import list_keys
from circuitscan.services.store.results import write_shard_outputs

SITE = "L0.resid_post"


def _union_members(union: Any) -> set[type]:
    return set(typing.get_args(typing.get_args(union)[0]))


def test_every_schema_kind_is_registered_once_with_its_models():
    params = _union_members(JobParams)
    results = _union_members(JobResult)
    assert {kind.params for kind in JOB_KINDS.values()} == params
    assert {kind.result for kind in JOB_KINDS.values() if kind.result} == results
    for name, kind in JOB_KINDS.items():
        assert kind.name == name == kind.params.model_fields["kind"].annotation.__args__[0]
        if kind.result is not None:
            assert kind.result.model_fields["kind"].default == name
            assert kind.partial is not None  # a result is merged from shard partials
    with pytest.raises(KeyError, match="unknown job kind 'nope'"):
        job_kind("nope")


def test_the_registry_imports_neither_torch_nor_ray():
    code = (
        "import sys; import circuitscan.services.jobs.kinds; "
        "print(sorted(m for m in ('torch', 'ray', 'sae_lens', 'transformer_lens') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _fields(model: type[BaseModel], path: str) -> type[BaseModel] | None:
    """The model a dotted field path leads to (None past a non-model field); fails if absent."""
    current: Any = model
    for part in path.split("."):
        assert isinstance(current, type) and issubclass(current, BaseModel), (model, path)
        assert part in current.model_fields, (model.__name__, path)
        annotation = current.model_fields[part].annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        current = (
            args[0] if len(args) == 1 and typing.get_origin(annotation) is not dict else annotation
        )
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def test_browser_views_name_fields_the_api_payload_has():
    for kind in JOB_KINDS.values():
        view, api = kind.browser, kind.api
        if view is None:
            continue
        assert api is not None and kind.result is not None
        assert view.query.split("?")[0] == api.path.lstrip("/")
        payload = api.page or kind.result
        row = _fields(payload, view.rows)
        assert row is not None
        for column in view.columns:
            _fields(row, column.field)
            if column.over:
                _fields(row, column.over)
        for name in [n.split(":")[0].lstrip("#") for n in view.title.split("{")[1:]]:
            _fields(payload, name.split("}")[0])


def _store(url: str) -> FeatureStore:
    layout = StoreLayout(
        sites=[], shard_size=2, model_fingerprint="m", job_hash="h", job_spec={"name": "t"}
    )
    return FeatureStore.create(url, layout)


def _commit(store: FeatureStore, shard_id: int, write: Callable[[Any], Any]) -> None:
    records = [PromptRecord(text=f"p{shard_id}{i}") for i in range(2)]
    entry = store.write_shard(shard_id, records, [[1, 2], [1, 3, 4]], {})
    store.commit_shard(write(entry))


def _attribution(nodes: list[str], total: list[float], count: list[int]) -> NodeSumsPartial:
    return NodeSumsPartial(
        nodes=nodes,
        node_sum=np.asarray(total, dtype=np.float64),
        node_sum_abs=np.abs(np.asarray(total, dtype=np.float64)),
        node_count=np.asarray(count, dtype=np.int64),
    )


def test_partials_lay_out_the_keys_older_stores_hold():
    store = _store("memory://kinds-layout")
    partial = AblationPartial(
        features=np.asarray([3, 9], dtype=np.int64),
        delta=np.asarray([[0.5, math.nan], [0.25, -1.0]]),
        baseline=np.asarray([1.0, 2.0]),
        scan=ScanInfo(site=SITE, n_ablations=3),
    )
    arrays, documents = partial.to_outputs()
    _commit(store, 0, lambda e: write_shard_outputs(store, e, arrays=arrays, documents=documents))
    keys = {
        k.split("results/", 1)[1] for k in list_keys(store.backend, "shards/") if "results/" in k
    }
    assert {k for k in keys if k.startswith("docs/")} == {"docs/scan.json"}
    assert {k.split("/")[1] for k in keys if k.startswith("arrays/") and k.count("/") > 1} == {
        "features",
        "delta",
        "baseline",
    }
    (back,) = committed_partials(store, AblationPartial)
    assert back.scan == partial.scan
    np.testing.assert_array_equal(back.delta, partial.delta)
    assert back.features.dtype == np.int64


@pytest.mark.parametrize(
    ("partial", "arrays", "documents"),
    [
        (
            NodeSumsPartial,
            {
                "node_sum": np.asarray([1.0, -2.0]),
                "node_sum_abs": np.asarray([1.0, 2.0]),
                "node_count": np.asarray([2, 1], dtype=np.int64),
            },
            {"nodes": ["z:L0:1@2", "feature:L0.resid_post:7@last"]},
        ),
        (
            SplicePartial,
            {},
            {
                "rows": [
                    {
                        "sites": [],
                        "variant": "clean",
                        "n_prompts": 2,
                        "metric_mean": 1.5,
                        "metric_std": 0.5,
                        "kl_metric_pos": 0.0,
                        "kl_all_pos": None,
                        "metric_recovered": None,
                    }
                ]
            },
        ),
        (
            DFAPartial,
            {},
            {
                "rows": [
                    {
                        "prompt": 0,
                        "dest_pos": 1,
                        "feature": 4,
                        "activation": 2.0,
                        "pre_activation": 2.5,
                        "bias": 0.5,
                        "contributions": [[0.25, 0.75], [1.0, 0.0]],
                        "roles": ["first", "dest"],
                    }
                ]
            },
        ),
    ],
)
def test_a_store_written_with_untyped_outputs_reads_back_into_partials(
    partial: type[ShardPartial], arrays: dict[str, np.ndarray], documents: dict[str, Any]
):
    """The arrays and documents exactly as the kinds wrote them before partials were typed."""
    store = _store(f"memory://kinds-old-{partial.__name__}")
    _commit(store, 0, lambda e: write_shard_outputs(store, e, arrays=arrays, documents=documents))
    (back,) = committed_partials(store, partial)
    again_arrays, again_documents = back.to_outputs()
    assert _added_fields_dropped(again_documents, documents) == documents
    assert set(again_arrays) == set(arrays)
    for name, values in arrays.items():
        np.testing.assert_array_equal(again_arrays[name], values)


def _added_fields_dropped(read: Any, written: Any) -> Any:
    """``read`` without the fields a kind added to its rows after ``written`` was stored.

    Such fields (e.g. DFA's ``chosen_by``) must read back as None; anything else must match.
    """
    if isinstance(read, dict) and isinstance(written, dict):
        added = {key for key in read.keys() - written.keys() if read[key] is None}
        return {
            k: _added_fields_dropped(v, written.get(k)) for k, v in read.items() if k not in added
        }
    if isinstance(read, list) and isinstance(written, list) and len(read) == len(written):
        return [_added_fields_dropped(r, w) for r, w in zip(read, written, strict=True)]
    return read


def _ctx(
    spec: JobSpec, n_prompts: int, site: str | None = None, fan_out: Any = None
) -> MergeContext:
    kept = [PromptRecord(text=str(i), corrupted=str(i)) for i in range(n_prompts)]
    return MergeContext(
        spec=spec,
        n_prompts=n_prompts,
        kept=kept,
        site=site,
        say=lambda _line: None,
        fan_out=fan_out or (lambda method, calls: pytest.fail("no second pass expected")),
    )


def _spec(job: Any, shard_size: int = 2) -> JobSpec:
    return JobSpec(
        saes=[{"source": f"default/{SITE}"}],
        prompts=IOISource(kind="ioi", n=4),
        job=job,
        store="memory://unused",
        shard_size=shard_size,
    )


def test_attribute_merge_pools_shards_and_verifies_the_top_nodes_on_the_workers():
    spec = _spec(AttributeParams(kind="attribute", method="atp", verify_top_k=1, top_nodes=2))
    parts = [
        _attribution(["a", "b"], [1.0, -4.0], [2, 2]),
        _attribution(["b", "c"], [-2.0, 0.5], [2, 1]),
    ]
    calls: list[tuple[str, list[tuple[Any, ...]]]] = []

    def fan_out(method: str, args: list[tuple[Any, ...]]) -> list[NodeSumsPartial]:
        calls.append((method, args))
        return [_attribution(nodes, [-1.0], [len(records)]) for records, nodes in args]

    result = job_kind("attribute").merge(spec.job, parts, _ctx(spec, 4, fan_out=fan_out))
    assert [e.node for e in result.top] == ["b", "a"]  # total |score| 6 over 4 prompts, then 1
    assert (result.top[0].mean, result.top[0].n_prompts) == (-1.5, 4)
    assert [(m, [n for _, n in a]) for m, a in calls] == [("verify_nodes", [["b"], ["b"]])]
    check = result.top[0].verification
    assert check is not None and (check.exact_mean, check.status) == (-0.5, "overestimated")
    assert check.ratio == pytest.approx(1 / 3)  # exact under half its estimate
    assert result.top[1].verification is None and result.n_nodes == 3 and result.n_verified == 1


def test_certify_needs_verification_and_sane_parameters():
    from pydantic import ValidationError

    from circuitscan.schemas.jobs import CertifyParams

    with pytest.raises(ValidationError, match="needs verify_top_k"):
        AttributeParams(kind="attribute", certify=CertifyParams(samples=10))
    for bad in ({"samples": 1}, {"samples": 9, "confidence": 1.0}, {"samples": 9, "p": 0.0}):
        with pytest.raises(ValidationError):
            CertifyParams(**bad)  # type: ignore[arg-type]
    plain = AttributeParams(kind="attribute", verify_top_k=2)
    assert "certify" not in plain.model_dump()  # specs without it hash as before it existed
    with_certify = plain.model_copy(update={"certify": CertifyParams(samples=8)})
    assert with_certify.model_dump()["certify"]["samples"] == 8
    assert AttributeParams.model_validate(with_certify.model_dump()) == with_certify


def test_attribute_views_state_the_certified_bound():
    from circuitscan.schemas.certification import CertificationResult, CertifiedNode

    bound = CertificationResult(
        theta=0.125, samples=40, p=0.25, confidence=0.95, delta=0.05, seed=0, mode="corrupt",
        n_nodes=2, n_prompts=4, forward_passes=40, patched_rows=150, closest_node="z:L1:0@3",
        binding_node="z:L1:0@3",
        nodes=[CertifiedNode(node="z:L1:0@3", estimate=0.05, estimate_abs=0.05, upper=0.125,
                             included=11)],
    )  # fmt: skip
    result = AttributionJobResult(
        job_hash="h", method="atp", n_prompts=4, n_nodes=3, n_verified=1, top=[],
        certification=bound,
    )  # fmt: skip
    header = job_kind("attribute").cli_view(result, 5).header
    assert "no unverified node exceeds 0.125 (95 %)" in header and "z:L1:0@3" in header
    assert result.certified == "no unverified node exceeds 0.125 (95 %)"
    from circuitscan.services.api.routes_results import _page

    api = job_kind("attribute").api
    assert api is not None
    page = _page(api.page, result, api.rows_from, api.rows_to, 0, 5).model_dump()
    assert page["certified"] == result.certified and page["certification"]["theta"] == 0.125
    plain = result.model_copy(update={"certification": None})
    assert "exceeds" not in job_kind("attribute").cli_view(plain, 5).header
    assert plain.certified is None


def test_auto_verification_needs_certify_and_keeps_older_specs_hashing_alike():
    from pydantic import ValidationError

    from circuitscan.schemas.jobs import CertifyParams

    with pytest.raises(ValidationError, match=r"verify_top_k: auto .* needs certify"):
        AttributeParams(kind="attribute", verify_top_k="auto")
    with pytest.raises(ValidationError, match=r"below certify\.top_k"):
        AttributeParams(
            kind="attribute", verify_top_k="auto",
            certify=CertifyParams(samples=8, top_k=10, budget=5),
        )  # fmt: skip
    with pytest.raises(ValidationError, match="apply to verify_top_k: auto only"):
        AttributeParams(kind="attribute", verify_top_k=3, certify=CertifyParams(samples=8, top_k=2))
    with pytest.raises(ValidationError):
        AttributeParams(kind="attribute", verify_top_k="most")  # type: ignore[arg-type]
    auto = AttributeParams(
        kind="attribute", method="atpstar2", verify_top_k="auto",
        certify=CertifyParams(samples=8, top_k=5),
    )  # fmt: skip
    assert AttributeParams.model_validate(auto.model_dump()) == auto
    assert auto.model_dump()["certify"] == {"samples": 8, "confidence": 0.95, "p": 0.25,
                                            "seed": 0, "top_k": 5}  # fmt: skip
    # Certify settings written before the auto fields dump (and hash) as they did.
    assert set(CertifyParams(samples=8).model_dump()) == {"samples", "confidence", "p", "seed"}
    from circuitscan.services.jobs.kinds.attribute import attribution_method

    assert attribution_method(auto).name == "atpstar2"


def test_attribute_views_state_what_ended_auto_verification():
    from circuitscan.schemas.certification import AutoVerification

    auto = AutoVerification(
        top_k=20, budget=100, verified=40, rounds=2, max_rounds=5, stopped_by="bound",
        smallest_top_effect=0.5, theta=0.25, confidence=0.95, forward_passes=440,
    )  # fmt: skip
    result = AttributionJobResult(
        job_hash="h", method="atpstar", n_prompts=4, n_nodes=300, n_verified=40, top=[],
        auto_verification=auto,
    )  # fmt: skip
    line = "top-20 complete at 95 %: no unverified node exceeds 0.25 < 0.5 after verifying 40"
    assert result.verified_complete == line
    assert line in job_kind("attribute").cli_view(result, 5).header
    from circuitscan.services.api.routes_results import _page

    api = job_kind("attribute").api
    assert api is not None
    page = _page(api.page, result, api.rows_from, api.rows_to, 0, 5).model_dump()
    assert page["verified_complete"] == line and page["auto_verification"]["verified"] == 40
    spent = auto.model_copy(update={"stopped_by": "budget", "theta": 0.75})
    assert spent.statement() == (
        "top-20 not shown complete: budget of 100 verified spent with θ = 0.75 ≥ 0.5"
    )
    browser = job_kind("attribute").browser
    assert browser is not None and browser.notes == ["certificate", "verified_complete"]


def test_ablation_merge_means_over_prompts_where_defined_outside_zero_mode():
    def part(delta: list[list[float]]) -> AblationPartial:
        return AblationPartial(
            features=np.asarray([3, 9], dtype=np.int64),
            delta=np.asarray(delta),
            baseline=np.asarray([1.0] * len(delta)),
            scan=ScanInfo(site=SITE, n_ablations=3),
        )

    parts = [part([[0.5, math.nan], [0.25, -1.0]]), part([[0.0, -2.0]])]
    zero = _spec(AblationScanParams(kind="ablation_scan", mode="zero"))
    mean = _spec(AblationScanParams(kind="ablation_scan", mode="mean"))
    by_zero = {
        f.feature: f
        for f in job_kind("ablation_scan").merge(zero.job, parts, _ctx(zero, 3)).features
    }
    by_mean = {
        f.feature: f
        for f in job_kind("ablation_scan").merge(mean.job, parts, _ctx(mean, 3)).features
    }
    assert (by_zero[9].mean_delta, by_zero[9].n_prompts, by_zero[9].n_active) == (-1.0, 3, 2)
    assert (by_mean[9].mean_delta, by_mean[9].n_prompts) == (-1.5, 2)
    assert by_zero[3].mean_delta == pytest.approx(0.25)


def test_splice_merge_pools_rows_exactly():
    def row(sites: list[str], variant: str, n: int, mean: float, std: float) -> SpliceEvalRow:
        return SpliceEvalRow(
            sites=sites, variant=variant, n_prompts=n, metric_mean=mean, metric_std=std,
            kl_metric_pos=0.1 * n,
        )  # fmt: skip

    values = [1.0, 2.0, 4.0]
    shards = [values[:2], values[2:]]
    parts = [
        SplicePartial(
            rows=[
                row(
                    [],
                    "clean",
                    len(v),
                    float(np.mean(v)),
                    float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                ),
                row([SITE], "mean_ablation", len(v), 0.0, 0.0),
            ]
        )
        for v in shards
    ]
    spec = _spec({"kind": "splice_eval", "reference_prompts": 2})
    result = job_kind("splice_eval").merge(spec.job, parts, _ctx(spec, 3))
    clean = result.rows[0]
    assert clean.metric_mean == pytest.approx(np.mean(values))
    assert clean.metric_std == pytest.approx(np.std(values, ddof=1))
    assert result.reference_prompts == 2 and result.rows[1].metric_recovered == 0.0


def test_dfa_merge_averages_by_head_and_role():
    def dfa_row(prompt: int, table: list[list[float]], roles: list[str]) -> DFARow:
        return DFARow(
            prompt=prompt, dest_pos=len(roles) - 1, feature=4, activation=1.0,
            pre_activation=sum(map(sum, table)) + 0.5, bias=0.5, contributions=table, roles=roles,
        )  # fmt: skip

    # A shard written before the BOS role had its name ("first") merges with a new one.
    parts = [
        DFAPartial(rows=[dfa_row(0, [[1.0, 2.0], [0.0, 1.0]], ["first", "dest"])]),
        DFAPartial(rows=[dfa_row(1, [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], ["BOS", "S1", "dest"])]),
    ]
    spec = _spec(DFAParams(kind="dfa"))
    (summary,) = job_kind("dfa").merge(spec.job, parts, _ctx(spec, 2, site="L0.z")).features
    assert summary.head_means == [2.5, 1.0]
    assert summary.source_means == {"BOS": 1.0, "dest": 2.0, "S1": 0.5}
    assert sum(summary.head_means) + summary.bias == pytest.approx(summary.mean_pre_activation)
