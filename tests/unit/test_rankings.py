"""Corpus-wide attribution rankings: the merged index's a·∂m/∂a sums and top hits against a
hand computation from the shards of a real store, and what a store without them answers."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import circuitscan as cs
from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.caching import cache_batch
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.store import SiteLayout, StoreLayout
from circuitscan.services.store import FeatureStore, QueryRangeError
from circuitscan.services.store.attribution_index import NoAttributionIndexError
from circuitscan.services.store.rankings import top_attributions
from circuitscan.testing import build_tiny_language_model, build_tiny_sae, write_tiny_store

SITES = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="resid_pre")]
K = 4  # examples_per_feature: small, so the top lists are truncated and the merge matters


@pytest.fixture(scope="module")
def tiny() -> Any:
    model = build_tiny_language_model(seed=1)
    saes = [build_tiny_sae(model, site, d_sae=20, seed=i) for i, site in enumerate(SITES)]
    return model, saes, generate_ioi(model.tokenizer, 11, seed=4)


@pytest.fixture(scope="module")
def store_dir(tiny, tmp_path_factory) -> Path:
    model, saes, records = tiny
    path = tmp_path_factory.mktemp("rankings") / "cache"
    write_tiny_store(str(path), model, saes, records, shard_size=3, examples_per_feature=K)
    return path


def _by_hand(store: FeatureStore, label: str) -> dict[str, Any]:
    """Every entry's a·g read back from the shards, summed and ranked in plain Python."""
    total: dict[int, float] = defaultdict(float)
    total_abs: dict[int, float] = defaultdict(float)
    entries: dict[int, list[tuple[float, int, int]]] = defaultdict(list)
    prompts: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for shard_id, entry in sorted(store.committed_entries().items()):
        site = store.site_shard(shard_id, label)
        offsets = store.prompt_shard(shard_id).prompt_offsets
        for local in range(entry.n_prompts):
            prompt = entry.prompt_start + local
            for position in range(int(offsets[local + 1] - offsets[local])):
                token = int(offsets[local]) + position
                lo, hi = int(site.token_offsets[token]), int(site.token_offsets[token + 1])
                for i in range(lo, hi):
                    assert site.gradients is not None
                    value = float(site.activations[i]) * float(site.gradients[i])
                    feature = int(site.feature_ids[i])
                    total[feature] += value
                    total_abs[feature] += abs(value)
                    entries[feature].append((value, prompt, position))
                    prompts[feature][prompt] += value
    return {"total": total, "abs": total_abs, "entries": entries, "prompts": prompts}


def test_index_sums_and_top_hits_equal_a_hand_computation_from_the_shards(store_dir) -> None:
    store = FeatureStore.open(str(store_dir))  # the persisted generation, loaded fresh
    assert len(store.committed_shard_ids()) == 4
    for site in SITES:
        hand = _by_hand(store, site.label)
        index = store.index.attribution(site.label)
        for feature in range(20):
            assert index.total[feature] == pytest.approx(hand["total"][feature], abs=1e-12)
            assert index.total_abs[feature] == pytest.approx(hand["abs"][feature], abs=1e-12)
            best = sorted(hand["entries"][feature], key=lambda e: (-abs(e[0]), e[1], e[2]))[:K]
            got = top_attributions(store, site.label, per="position", feature=feature, n=K)
            assert [(r.prompt, r.position) for r in got.rows] == [(p, q) for _, p, q in best]
            assert [r.value for r in got.rows] == pytest.approx([v for v, _, _ in best])
            sums = hand["prompts"][feature]
            ranked = sorted(sums, key=lambda p: (-abs(sums[p]), p))[:K]
            got = top_attributions(store, site.label, per="prompt", feature=feature, n=K)
            assert [r.prompt for r in got.rows] == ranked
            assert [r.value for r in got.rows] == pytest.approx([sums[p] for p in ranked])
        ranking = top_attributions(store, site.label, n=5)
        order = sorted(hand["total"], key=lambda f: (-abs(hand["total"][f]), f))
        assert [r.feature for r in ranking.rows] == order[:5]
        by_abs = top_attributions(store, site.label, n=5, rank_by="abs")
        assert [r.feature for r in by_abs.rows] == sorted(
            hand["abs"], key=lambda f: (-hand["abs"][f], f)
        )[:5]
        assert ranking.available == len(hand["total"])


def test_the_python_api_and_its_bad_input(store_dir) -> None:
    view = cs.open_store(str(store_dir))
    label = SITES[1].label
    ranking = view.top_attributions(label, n=3)
    assert ranking.per == "feature" and len(ranking.rows) == 3
    pushes = view.top_attributions(label, feature=ranking.rows[0].feature)
    assert pushes.per == "prompt" and pushes.rows and pushes.rows[0].position is None
    with pytest.raises(QueryRangeError, match="give the feature"):
        view.top_attributions(label, per="position")
    with pytest.raises(QueryRangeError, match="out of range for site"):
        view.top_attributions(label, feature=20)
    with pytest.raises(QueryRangeError, match="leave out the feature"):
        view.top_attributions(label, per="feature", feature=1)
    # The AtP term needs the corrupted side: a plain cache says so (and keeps no AtP sums).
    assert ranking.error_atp is None and all(row.atp is None for row in ranking.rows)
    with pytest.raises(NoAttributionIndexError, match="not a paired cache"):
        view.top_attributions(label, rank_by="atp")


def test_stores_without_gradients_or_with_an_older_index_answer_clearly(tiny, tmp_path) -> None:
    model, saes, records = tiny
    url = str(tmp_path / "plain")
    layout = StoreLayout(
        sites=[SiteLayout(label=s.label, hook_name=s.hook_name, d_sae=20) for s in SITES],
        gradients=False,
        shard_size=4,
    )
    store = FeatureStore.create(url, layout)
    batch = tokenize_prompts(model, records[:4])
    caches = cache_batch(model, saes, batch.tokens, batch.lengths, None, gradients=False)
    store.commit_shard(store.write_shard(0, records[:4], batch.token_lists(), caches))
    store.flush_index()
    with pytest.raises(NoAttributionIndexError, match="keeps no gradients"):
        top_attributions(FeatureStore.open(url), SITES[0].label)
    cli = subprocess.run(
        [sys.executable, "-m", "circuitscan.services.cli", "query", url, "top-attributions",
         "--site", SITES[0].label],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2 and "keeps no gradients" in cli.stderr, cli.stderr
    assert "Traceback" not in cli.stderr

    # An index generation as circuitscan wrote it before attribution sums existed: the
    # writer persists one with none (its own checksums intact, so it is not damage).
    older = str(tmp_path / "older")
    write_tiny_store(older, model, saes, records[:5], shard_size=3)
    writer = FeatureStore.open(older)
    writer.feature_index(SITES[0].label)
    writer.index._attribution = None
    writer.flush_index()
    assert not [key for key in writer.location.list_keys("index/") if "/attribution/" in key]
    with pytest.raises(NoAttributionIndexError, match=r"circuitscan repair"):
        top_attributions(FeatureStore.open(older), SITES[0].label)
    FeatureStore.open(older).index.rebuild()  # what `circuitscan repair` does
    assert top_attributions(FeatureStore.open(older), SITES[0].label).rows


def test_cli_prints_the_rankings(store_dir) -> None:
    store = FeatureStore.open(str(store_dir))
    label = SITES[1].label
    best = top_attributions(store, label, n=1).rows[0]
    out = subprocess.run(
        [sys.executable, "-m", "circuitscan.services.cli", "query", str(store_dir),
         "top-attributions", "--site", label, "--n", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"features of {label} by |Σ a·g|")
    assert lines[3].split()[0] == str(best.feature) and len(lines) == 6
    per = subprocess.run(
        [sys.executable, "-m", "circuitscan.services.cli", "query", str(store_dir),
         "top-attributions", "--site", label, "--feature", str(best.feature), "--per",
         "position", "--n", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert per.returncode == 0, per.stderr
    rows = top_attributions(store, label, per="position", feature=best.feature, n=2).rows
    assert [line.split()[:2] for line in per.stdout.splitlines()[3:]] == [
        [str(r.prompt), str(r.position)] for r in rows
    ]
    assert np.isfinite(best.value)
