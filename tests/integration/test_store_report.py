"""`circuitscan report STORE`: a real store with cached shards and a job result → HTML + PNGs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_store_contract import N_SHARDS, _fill, make_shard

from circuitscan.schemas.job_results import (
    AttributionJobResult,
    DFAFeatureSummary,
    DFAJobResult,
    NodeEffect,
    NodeVerification,
)
from circuitscan.services.store.results import write_job_result

pytestmark = pytest.mark.integration
PNG = b"\x89PNG"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "circuitscan.services.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_report_renders_cached_features_and_job_results(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    store = _fill(url, {i: make_shard(i) for i in range(N_SHARDS)})
    top = [
        NodeEffect(
            node="z:L1:0@last",
            mean=-0.75,
            mean_abs=0.75,
            n_prompts=8,
            verification=NodeVerification(
                exact_mean=-0.7, exact_mean_abs=0.7, n_prompts=8, status="confirmed"
            ),
        ),
        NodeEffect(node="q:L1:1@last", mean=0.25, mean_abs=0.3, n_prompts=8),
    ]
    write_job_result(
        store,
        AttributionJobResult(
            job_hash="test", method="atpstar", n_prompts=8, n_nodes=2, n_verified=1, top=top
        ),
    )
    write_job_result(
        store,
        DFAJobResult(
            job_hash="test",
            site="L1.z",
            position="END",
            n_prompts=8,
            features=[
                DFAFeatureSummary(
                    feature=77,
                    n_prompts=8,
                    mean_activation=1.5,
                    mean_pre_activation=1.5,
                    bias=0.25,
                    head_means=[1.0, 0.25],
                    source_means={"S1": 1.0, "other": 0.25},
                )
            ],
        ),
    )
    out = tmp_path / "report"
    done = _cli("report", url, "--out", str(out))
    assert done.returncode == 0, done.stderr
    html = (out / "index.html").read_text()
    index = store.feature_index("L0.resid_post")
    busiest = int(index.count.argmax())
    assert f">{busiest}<" in html  # the most frequent feature is in its site's table
    assert "z:L1:0@last" in html and "confirmed" in html
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "Direct feature attribution (L1.z at END)" in html and "S1 (+1)" in html
    assert "dfa_top_feature.png" in pngs
    assert "attribution_vs_exact.png" in pngs and "firing_L0.resid_post.png" in pngs
    assert all((out / name).read_bytes().startswith(PNG) for name in pngs)
    # The browser's figures inline: a heatmap per head kind and position (the exact one beside
    # the estimate where verified), the scatter, the DFA splits; each with its data.
    for figure, values in (
        ("heads-estimate", ["-0.75", "0.25"]),
        ("heads-exact", ["-0.7"]),
        ("dfa-head", ["1", "0.25"]),
        ("dfa-source", ["0.25", "1"]),  # roles in name order: S1, other
    ):
        svgs = re.findall(rf"<svg class='figure' data-figure='{figure}'.*?</svg>", html, re.S)
        assert sorted(
            v for svg in svgs for v in re.findall(r"data-value='([^']+)'", svg)
        ) == sorted(values), figure
    assert "data-x='-0.7' data-y='-0.75'" in html  # the verified node in the scatter
    # Nodes link to pages in the report: the head's table.
    assert "href='#page-head-L1-0'" in html and "id='page-head-L1-0'" in html
    # The DFA's feature 77 is beyond this store's d_sae of 32: it gets no page, and no link.
    assert "page-feature-L1-z-77" not in html
    # The busiest feature's page: its histogram counts every activation it has.
    page = re.search(rf"id='page-feature-L0-resid-post-{busiest}'.*?</svg>", html, re.S)
    assert page is not None
    counts = [int(v) for v in re.findall(r"data-value='([^']+)' data-bin", page.group(0))]
    assert sum(counts) == int(index.count[busiest])


def test_report_on_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    done = _cli("report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "no feature store" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "nowhere").exists()
