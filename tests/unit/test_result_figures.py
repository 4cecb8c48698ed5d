"""The result figures against the results they draw, and the demo's report holding every one.

One store per job as the demo writes them (a cache store with two SAE sites,
and results-only stores for attribution, an ablation scan with per-prompt Δm
in its shards, a splice evaluation and a DFA): every figure's data elements
carry exactly the values of the result they come from, and nodes link to the
feature and head pages of the same report.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

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
)
from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import StoreLayout
from circuitscan.services.demo_report import write_demo_report
from circuitscan.services.feature_directions_run import directions_arrays
from circuitscan.services.jobs.kinds.ablation_scan import AblationPartial, ScanInfo
from circuitscan.services.reports.result_figures import result_figures
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.feature_directions import write_directions
from circuitscan.services.store.feature_page import feature_page
from circuitscan.services.store.results import write_job_result, write_shard_outputs
from circuitscan.testing.store_contract import D_SAE, SITES, contract_shards, fill_store
from circuitscan.testing.tiny_models import build_tiny_model, build_tiny_sae

RESID, Z = "L0.resid_post", "L1.z"
# Per shard: [prompt, feature] Δm of features 3, 5, 7 (NaN: not ablated on that prompt).
DELTAS = [
    np.array([[-0.5, 0.25, np.nan], [-0.75, 0.0, 0.125]]),
    np.array([[-0.25, np.nan, 0.375]]),
]
FEATURES = [3, 5, 7]


def _verified(exact: float) -> NodeVerification:
    return NodeVerification(
        exact_mean=exact, exact_mean_abs=abs(exact), n_prompts=3, status="confirmed", ratio=1.0
    )


ATTRIBUTION = AttributionJobResult(
    job_hash="demo", method="atpstar", n_prompts=3, n_nodes=40, n_verified=2, top=[
        NodeEffect(node="z:L1:0@END", mean=-1.25, mean_abs=1.25, n_prompts=3,
                   verification=_verified(-1.5)),
        NodeEffect(node=f"feature:{RESID}:3@S2", mean=0.75, mean_abs=0.75, n_prompts=3,
                   verification=_verified(0.5)),
        NodeEffect(node="q:L1:1@END", mean=0.25, mean_abs=0.5, n_prompts=3),
        NodeEffect(node=f"feature:{RESID}:5@END", mean=-0.125, mean_abs=0.25, n_prompts=3),
        NodeEffect(node=f"sae_error:{RESID}@END", mean=0.0625, mean_abs=0.0625, n_prompts=3),
    ],
)  # fmt: skip
DFA = DFAJobResult(
    job_hash="demo", site=Z, position="END", n_prompts=3, features=[
        DFAFeatureSummary(feature=9, n_prompts=3, mean_activation=2.0, mean_pre_activation=2.0,
                          bias=0.0, head_means=[1.5, 0.5], source_means={"IO": 1.25, "S1": 0.75}),
    ],
)  # fmt: skip
SPLICE = SpliceEvalJobResult(job_hash="demo", n_prompts=3, reference_prompts=3, rows=[
    SpliceEvalRow(sites=[RESID], variant="spliced", n_prompts=3, metric_mean=1.5, metric_std=0.2,
                  kl_metric_pos=0.125),
])  # fmt: skip


def _ablation() -> AblationJobResult:
    dense = np.concatenate(DELTAS)
    rows = []
    for j, feature in enumerate(FEATURES):
        column = np.nan_to_num(dense[:, j])  # zero mode: not ablated changes nothing
        rows.append(
            FeatureDelta(site=RESID, feature=feature, mean_delta=float(column.mean()),
                         mean_abs_delta=float(np.abs(column).mean()), n_prompts=3,
                         n_active=int((~np.isnan(dense[:, j])).sum()))
        )  # fmt: skip
    rows.sort(key=lambda r: -r.mean_abs_delta)
    return AblationJobResult(
        job_hash="demo", site=RESID, mode="zero", n_prompts=3, n_ablations=5, baseline_mean=2.0,
        features=rows,
    )  # fmt: skip


def _results_store(path: Path, name: str, *, shards: list[np.ndarray] | None = None) -> None:
    """A store as a job of ``name`` leaves it: prompts, no SAE cache, its shards' partials."""
    layout = StoreLayout(
        sites=[], shard_size=2, model_fingerprint="tiny", job_hash="demo",
        job_spec={"name": name, "job": {"kind": name}},
    )  # fmt: skip
    store = FeatureStore.create(str(path), layout)
    for shard_id, delta in enumerate(shards or []):
        prompts = [PromptRecord(text=f"p{shard_id}.{i}") for i in range(len(delta))]
        entry = store.write_shard(shard_id, prompts, [[1, 2, 3]] * len(delta), {})
        partial = AblationPartial(
            features=np.array(FEATURES, dtype=np.int64), delta=delta,
            baseline=np.full(len(delta), 2.0), scan=ScanInfo(site=RESID, n_ablations=3),
        )  # fmt: skip
        arrays, documents = partial.to_outputs()
        store.commit_shard(write_shard_outputs(store, entry, arrays=arrays, documents=documents))


STEPS = ("cache", "attribute", "ablation_scan", "splice_eval", "dfa")


def _spec(step: str, store: Path) -> JobSpec:
    """A job spec of the demo's (only its name and store matter to the report)."""
    fields = {
        "name": f"ioi-{step}",
        "saes": [{"source": "default/L15.resid_post"}],
        "prompts": {"kind": "ioi", "n": 3},
        "job": {"kind": "cache"},
        "store": str(store),
    }
    return JobSpec.model_validate(fields)


@pytest.fixture(scope="module")
def demo_stores(tmp_path_factory) -> dict[str, JobSpec]:
    root = tmp_path_factory.mktemp("demo")
    cache = fill_store(str(root / "cache"), contract_shards())
    model = build_tiny_model(seed=0)  # the contract's model and SAEs: their directions
    for i, site in enumerate(SITES):
        sae = build_tiny_sae(model, site, d_sae=D_SAE, seed=i)
        write_directions(cache, site.label, directions_arrays(model, sae, k=4, heads=3))
    _results_store(root / "attribute", "attribute")
    write_job_result(FeatureStore.open(str(root / "attribute")), ATTRIBUTION)
    _results_store(root / "ablation_scan", "ablation_scan", shards=DELTAS)
    write_job_result(FeatureStore.open(str(root / "ablation_scan")), _ablation())
    _results_store(root / "splice_eval", "splice_eval")
    write_job_result(FeatureStore.open(str(root / "splice_eval")), SPLICE)
    _results_store(root / "dfa", "dfa")
    write_job_result(FeatureStore.open(str(root / "dfa")), DFA)
    return {step: _spec(step, root / step) for step in STEPS}


def _figures(html: str, name: str, quote: str = "'") -> list[str]:
    q = quote
    return re.findall(rf"<svg class={q}figure{q} data-figure={q}{name}{q}.*?</svg>", html, re.S)


def _values(svg: str, element: str) -> list[float]:
    return [float(v) for v in re.findall(rf"<{element} class='[^']*' data-value='([^']+)'", svg)]


def test_ablation_figure_draws_every_prompt_delta(demo_stores) -> None:
    store = FeatureStore.open(demo_stores["ablation_scan"].store)
    (figure,) = result_figures(store)
    assert figure.name == "ablation-deltas"
    rows = re.findall(r"<g class='row'>(.*?)</g>", figure.svg, re.S)
    by_mean = [f.feature for f in _ablation().features]  # rows: largest mean |Δm| first
    dense = np.concatenate(DELTAS)
    for feature, row in zip(by_mean, rows, strict=True):
        column = dense[:, FEATURES.index(feature)]
        expected = column[~np.isnan(column)]
        assert Counter(_values(row, "line")) == Counter(float(f"{v:.6g}") for v in expected)
        assert _values(row, "path") == pytest.approx([expected.mean()], abs=1e-6)


def test_demo_report_shows_every_figure_with_its_data(demo_stores, tmp_path) -> None:
    stores = {step: spec.store for step, spec in demo_stores.items()}
    html = write_demo_report(
        tmp_path, demo_stores, ATTRIBUTION, _ablation(), SPLICE, DFA
    ).read_text()
    # Tables first (as before), then every figure, each with the result's values.
    assert "ioi-attribute" in html and stores["dfa"] in html
    expected = {
        "heads-estimate": [-1.25, 0.25],  # z@END and q@END: one heatmap per kind and position
        "heads-exact": [-1.5],
        "feature-bars": [0.75, -0.125],
        "node-bars": [0.0625],
        "ablation-deltas": sorted(v for v in np.concatenate(DELTAS).ravel() if v == v),
        "dfa-head": [1.5, 0.5],
        "dfa-source": [1.25, 0.75],
    }
    for name, values in expected.items():
        svgs = _figures(html, name)
        assert svgs, f"no {name} figure"
        element = {"ablation-deltas": "line"}.get(name, "rect")
        got = [v for svg in svgs for v in _values(svg, element)]
        assert sorted(got) == pytest.approx(sorted(values)), name
    (scatter,) = _figures(html, "atp-vs-exact")
    points = re.findall(r"data-x='([^']+)' data-y='([^']+)'", scatter)
    assert sorted((float(x), float(y)) for x, y in points) == [(-1.5, -1.25), (0.5, 0.75)]
    # Nodes link to pages of the report: features of the cache store, heads.
    for target in ("page-feature-L0-resid-post-3", "page-feature-L0-resid-post-5",
                   "page-feature-L1-z-9", "page-head-L1-0", "page-head-L1-1"):  # fmt: skip
        assert f"href='#{target}'" in html and f"id='{target}'" in html, target
    # Each feature page has its histogram, counting every activation of the feature, its
    # logit effects and the heads reading it (stored directions), linked to their pages.
    cache = FeatureStore.open(stores["cache"])
    block = re.search(r"<div class='feature-page' id='page-feature-L0-resid-post-3'.*?</div>",
                      html, re.S)  # fmt: skip
    assert block is not None
    page = feature_page(cache, RESID, 3)
    counts = [int(v) for v in re.findall(r"data-value='([^']+)' data-bin", block.group(0))]
    assert sum(counts) == int(cache.feature_index(RESID).count[3]) > 0
    effects = [e.logit for e in [*page.promoted, *reversed(page.suppressed)]]
    (svg,) = _figures(block.group(0), "logit-effects")
    assert _values(svg, "rect") == pytest.approx(effects, rel=1e-5)
    (svg,) = _figures(block.group(0), "reading-heads")
    assert _values(svg, "rect") == pytest.approx([h.gain for h in page.reading_heads], rel=1e-5)
    assert all(h.layer == 1 for h in page.reading_heads) and len(page.reading_heads) == 3
    shaded = re.findall(r"<span class='tok[^']*' data-value='([^']+)'", block.group(0))
    assert len(shaded) == sum(len(e.values) for e in [*page.top, *page.sampled])
