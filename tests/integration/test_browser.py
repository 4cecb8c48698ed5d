"""The feature browser in a real headless Chromium against a real API server and store.

The page renders from its URL query (store, site, feature, prompt); Chromium
dumps the rendered DOM and takes a screenshot, and both are checked for the
content the store holds: the top examples with the hit token highlighted, the
feature's summary, and the prompt's tokens with their features; the feature
page's figures (histogram, logit effects, reading heads) and examples shaded
token by token; a results store's attribution maps, ablation and DFA figures
with their nodes linked to feature and head pages. Every page must fit the
1400-pixel window without horizontal scrolling.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from api_server import D_SAE, SITES, build_store, thread_server
from PIL import Image

from circuitscan.schemas.analyses import SpliceEvalRow
from circuitscan.schemas.certification import (
    AutoVerification,
    CertificationResult,
    CertifiedNode,
)
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
from circuitscan.schemas.models import ModelSpec
from circuitscan.schemas.store import StoreLayout
from circuitscan.services.api import ApiSettings
from circuitscan.services.feature_directions_run import directions_arrays
from circuitscan.services.model_loading import load_tokenizer
from circuitscan.services.store import FeatureStore, feature_summary, features_at, top_examples
from circuitscan.services.store.feature_directions import write_directions
from circuitscan.services.store.feature_page import feature_page
from circuitscan.services.store.rankings import top_attributions
from circuitscan.services.store.results import write_job_result
from circuitscan.testing.tiny_models import build_tiny_sae

pytestmark = pytest.mark.integration

SITE = SITES[1].label
WINDOW = (1400, 1000)
HIGHLIGHT = (0xF7, 0x90, 0x09)  # .tok.hit background in services/web/style.css


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing on CI (.ci/run installs Debian's chromium package)")
    pytest.skip("no Chromium on this machine (apt-get install chromium)")


def _run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        # Virtual time runs until the page's fetches and rendering are done.
        "--virtual-time-budget=20000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def browser_store(tmp_path_factory, tiny_hf_model_dir):
    root = tmp_path_factory.mktemp("browser") / "stores"
    root.mkdir()
    store = build_store(root / "ioi-demo", tiny_hf_model_dir)
    # The SAEs build_store cached with (same seeds): their logit effects and reading heads.
    from circuitscan.services.model_loading import load_model

    model = load_model(ModelSpec(source=str(tiny_hf_model_dir))).model
    for i, site in enumerate(SITES):
        sae = build_tiny_sae(model, site, d_sae=D_SAE, seed=i, dtype=torch.float32)
        write_directions(store, site.label, directions_arrays(model, sae, k=5, heads=3))
    return root, store


def _figure(dom: str, name: str) -> str:
    """The markup of every figure ``name`` (its <svg data-figure=...> elements), joined."""
    found = re.findall(rf"<svg class=\"figure\" data-figure=\"{name}\".*?</svg>", dom, re.S)
    assert found, f"no {name} figure"
    return "".join(found)


def _values(svg: str, element: str) -> list[float]:
    """data-value of every data element (bar, cell, point) of a figure."""
    return [float(v) for v in re.findall(rf'<{element} class="[^"]*" data-value="([^"]+)"', svg)]


def _fits_window(dom: str) -> None:
    width = re.search(r'<body[^>]*data-scroll-width="(\d+)"', dom)
    assert width is not None and int(width.group(1)) <= WINDOW[0], "the page scrolls sideways"


def test_feature_browser_renders_store_content(browser_store, tmp_path, tiny_hf_model_dir):
    chromium = _chromium()
    root, store = browser_store
    tokenizer = load_tokenizer(ModelSpec(source=str(tiny_hf_model_dir)))
    # The feature with the largest attribution at the last token of prompt 0.
    last = len(store.prompt_tokens(0)) - 1
    feature = features_at(store, SITE, 0, last, limit=1).feature_ids[0]
    examples = top_examples(store, SITE, feature, n=10, context=6)
    summary = feature_summary(store, SITE, feature)
    hits = [tokenizer.decode([ex.context_token_ids[ex.hit_index]]) for ex in examples]

    with thread_server(ApiSettings(store_root=root)) as url:
        page = f"{url}/web/?store=ioi-demo&site={SITE}&feature={feature}&prompt=0"
        shot = tmp_path / "browser.png"
        screenshot = _run_chromium(chromium, tmp_path / "profile1", f"--screenshot={shot}", page)
        assert shot.is_file(), screenshot.stderr[-3000:]
        dumped = _run_chromium(chromium, tmp_path / "profile2", "--dump-dom", page)
    dom = dumped.stdout
    assert 'data-state="ready"' in dom, (dumped.stderr[-2000:], dom[-3000:])

    # Top examples: one list item each, the hit token highlighted.
    highlighted = [
        html.unescape(t) for t in re.findall(r'<span class="tok hit"[^>]*>([^<]*)</span>', dom)
    ]
    assert highlighted == hits
    # The summary block names the feature and shows its count.
    summary_block = re.search(r'<dl id="summary" data-feature="(\d+)">(.*?)</dl>', dom, re.S)
    assert summary_block and int(summary_block.group(1)) == feature
    assert f"<dt>count</dt><dd>{summary.count}</dd>" in summary_block.group(2)
    # The prompt view: every token of prompt 0, and the chosen feature among the last token's.
    prompt_tokens = [tokenizer.decode([int(t)]) for t in store.prompt_tokens(0)]
    cells = [html.unescape(t) for t in re.findall(r'<td class="token">([^<]*)</td>', dom)]
    assert cells == prompt_tokens
    assert f'data-feature="{feature}"' in dom

    # The feature page: histogram bars adding up to the feature's count, its promoted and
    # suppressed tokens and reading heads, and its examples shaded token by token.
    built = feature_page(store, SITE, feature)
    assert sum(_values(_figure(dom, "histogram"), "rect")) == summary.count
    effects = _values(_figure(dom, "logit-effects"), "rect")
    expected = [e.logit for e in built.promoted + built.suppressed[::-1]]
    assert effects == pytest.approx(expected, rel=1e-5)
    # The z SAE sits in the last of the tiny model's two layers: no head reads after it.
    assert built.reading_heads == [] and 'data-figure="reading-heads"' not in dom
    peaks = re.findall(r'<span class="vtok peak"[^>]*data-value="([^"]+)"', dom)
    assert [float(p) for p in peaks[: len(built.top)]] == pytest.approx(
        [ex.activation for ex in built.top]
    )
    assert len(peaks) == len(built.top) + len(built.sampled)
    assert bool(built.sampled) == (summary.count > len(built.top))
    # Where it pushes the metric most: the store's ranking of prompts by Σ a·g, in order.
    pushes = re.search(r'<ol id="feature-pushes">(.*?)</ol>', dom, re.S)
    assert pushes is not None
    ranking = top_attributions(store, SITE, per="prompt", feature=feature, n=10)
    assert ranking.rows and [
        int(p) for p in re.findall(r'data-prompt="(\d+)"', pushes.group(1))
    ] == [r.prompt for r in ranking.rows]
    _fits_window(dom)

    # The screenshot: the window's size, real content, and the highlight colour on it.
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200
    highlight_pixels = sum(count for count, rgb in colours if rgb == HIGHLIGHT)
    assert highlight_pixels > 100 * len(hits)
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("CIRCUITSCAN_SCREENSHOT_DIR")
    if keep:  # for looking at the page by eye
        shutil.copy(shot, Path(keep) / "browser.png")


CERTIFICATE = CertificationResult(
    theta=0.125, samples=40, p=0.25, confidence=0.95, delta=0.05, seed=0, mode="corrupt",
    n_nodes=95, n_prompts=4, forward_passes=40, patched_rows=150, closest_node="k:L0:1@IO",
    binding_node="k:L0:1@IO",
    nodes=[CertifiedNode(node="k:L0:1@IO", estimate=0.05, estimate_abs=0.05, upper=0.125,
                         included=11)],
)  # fmt: skip
AUTO = AutoVerification(
    top_k=1, budget=5, verified=1, rounds=1, max_rounds=5, stopped_by="bound",
    smallest_top_effect=1.5, theta=0.125, confidence=0.95, forward_passes=41,
)  # fmt: skip


def _results_only_store(path: Path) -> None:
    """A store as an attribute job leaves it (prompts, no SAE cache), holding every result kind."""
    layout = StoreLayout(
        sites=[], shard_size=4, model_fingerprint="tiny-llama", job_hash="browser-results",
        job_spec={"name": "attr", "job": {"kind": "attribute"}},
    )  # fmt: skip
    store = FeatureStore.create(str(path), layout)
    verified = NodeVerification(
        exact_mean=-1.5, exact_mean_abs=1.5, n_prompts=4, status="confirmed", ratio=1.2
    )
    nodes = [
        NodeEffect(
            node="z:L1:0@END", mean=-1.25, mean_abs=1.25, n_prompts=4, verification=verified
        ),
        NodeEffect(node="k:L0:1@IO", mean=0.5, mean_abs=0.75, n_prompts=4),
        NodeEffect(node=f"feature:{SITE}:7@END", mean=0.375, mean_abs=0.5, n_prompts=4),
    ]
    results = [
        AttributionJobResult(
            job_hash="r", method="atpstar", n_prompts=4, n_nodes=96, n_verified=1, top=nodes,
            certification=CERTIFICATE, auto_verification=AUTO,
        ),
        AblationJobResult(
            job_hash="r", site=SITE, mode="zero", n_prompts=4, n_ablations=8, baseline_mean=2.0,
            features=[FeatureDelta(site=SITE, feature=17, mean_delta=-0.3, mean_abs_delta=0.4,
                                   n_prompts=4, n_active=3)],
        ),
        SpliceEvalJobResult(job_hash="r", n_prompts=4, reference_prompts=4, rows=[
            SpliceEvalRow(sites=[SITE], variant="spliced", n_prompts=4, metric_mean=1.5,
                          metric_std=0.2, kl_metric_pos=0.125),
        ]),
        DFAJobResult(job_hash="r", site=SITE, position="END", n_prompts=4, features=[
            DFAFeatureSummary(feature=5, n_prompts=4, mean_activation=2.0, mean_pre_activation=2.0,
                              bias=0.0, head_means=[0.25, -1.5], source_means={"S1": 1.75}),
        ]),
    ]  # fmt: skip
    for result in results:
        write_job_result(store, result)


def test_browser_shows_the_job_results_of_a_store_without_a_cache(browser_store, tmp_path):
    chromium = _chromium()
    root, _ = browser_store  # beside a cache store of the results' site: features link there
    _results_only_store(root / "attr")
    with thread_server(ApiSettings(store_root=root)) as url:
        dumped = _run_chromium(
            chromium, tmp_path / "profile", "--dump-dom", f"{url}/web/?store=attr"
        )
        head = _run_chromium(
            chromium, tmp_path / "profile2", "--dump-dom", f"{url}/web/?store=attr&head=1.0"
        )
    dom = dumped.stdout
    assert 'data-state="ready"' in dom, (dumped.stderr[-2000:], dom[-3000:])
    assert '<p id="status" role="status" class="">' in dom  # no error, nothing to pick
    assert re.search(r'<select id="site" name="site" disabled=""', dom)
    kinds = re.findall(r'<div class="result" data-kind="([a-z_]+)">', dom)
    assert sorted(kinds) == ["ablation_scan", "attribute", "dfa", "splice_eval"]
    cells = [html.unescape(c) for c in re.findall(r"<td>([^<]*)</td>", dom)]
    for expected in (
        ["z:L1:0@END", "-1.25", "1.25", "-1.5", "1.2", "confirmed"],  # exact / estimate
        ["k:L0:1@IO", "0.5", "0.75", "—", "—", "—"],
        ["17", "-0.3", "0.4", "3/4"],
        [SITE, "spliced", "1.5", "0.125"],
        ["5", "2", "h1 -1.5", "S1 1.75"],
    ):
        assert any(cells[i : i + len(expected)] == expected for i in range(len(cells))), expected
    assert "top 3 of 96 nodes, 1 verified" in dom
    # The certificate and what ended auto verification, one line each under the title.
    notes = [html.unescape(n) for n in re.findall(r'<p class="note">([^<]*)</p>', dom)]
    assert notes == [CERTIFICATE.summary_line(), AUTO.statement()]
    assert "no unverified node exceeds 0.125 (95 %)" in notes[0] and "k:L0:1@IO" in notes[0]

    # Attribution maps: a layer × head heatmap per kind and position, the exact one beside the
    # estimate where verified, the scatter; ablation and DFA figures; nodes link to pages.
    assert sorted(_values(_figure(dom, "heads-estimate"), "rect")) == [-1.25, 0.5]
    assert _values(_figure(dom, "heads-exact"), "rect") == [-1.5]
    scatter = _figure(dom, "atp-vs-exact")
    assert re.search(r'data-x="-1.5" data-y="-1.25"', scatter)
    assert _values(_figure(dom, "feature-bars"), "rect") == [0.375]  # feature nodes per site
    assert _values(_figure(dom, "ablation-means"), "rect") == [-0.3]
    assert _values(_figure(dom, "dfa-head"), "rect") == [0.25, -1.5]
    assert _values(_figure(dom, "dfa-source"), "rect") == [1.75]
    links = {html.unescape(h) for h in re.findall(r'<a href="([^"]+)"', dom)}
    assert "?store=attr&head=1.0" in links  # z:L1:0@END → head L1.0
    assert f"?store=ioi-demo&site={SITE}&feature=5" in links  # DFA's f5 → the cache store
    assert f"?store=ioi-demo&site={SITE}&feature=7" in links  # the feature bar's node
    _fits_window(dom)
    # The head page the link opens: its nodes with estimate and exact Δm.
    head_dom = head.stdout
    assert 'data-state="ready"' in head_dom, head.stderr[-2000:]
    row = re.search(r'<tr data-node="z:L1:0@END"><td>z:L1:0@END</td><td>(.*?)</td><td>(.*?)</td>',
                    head_dom)  # fmt: skip
    assert row and row.groups() == ("-1.25", "-1.5")
