"""Store-fed attribution on real local Ray: a paired cache, then AtP from it with no model pass.

The tiny HF Llama and its two SAEs; one paired cache job and one model-run
attribute job (``method: atp``, nodes ``sae_feature`` + ``sae_error``) on the
same IOI prompts are shared by the module. The store-fed job must give the
model-run job's nodes and scores within the float16 storage bound of
docs/paired_caches.md, refuse bad caches before doing anything, and give the
identical result when a worker running an estimate task is killed (the task is
retried).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from circuitscan.schemas.jobs import (
    AttributeParams,
    CacheParams,
    ExecutionSpec,
    IOISource,
    JobSpec,
    StoreSource,
)
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.runner import JobError, run_job
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import read_result

pytestmark = pytest.mark.integration

U16 = 2.0**-11  # float16 unit roundoff
PROMPTS = IOISource(kind="ioi", n=12, seed=3)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def jobs(local_ray, tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path_factory):
    """(make_spec, paired cache URL, model-run result) shared by the module's tests."""
    root = tmp_path_factory.mktemp("store_fed")

    def make(store: Path | str, job, **fields) -> JobSpec:
        base = {
            "name": "tiny",
            "model": ModelSpec(source=str(tiny_hf_model_dir)),
            "saes": [SAESpec(source=str(path)) for path in tiny_hf_sae_dirs],
            "prompts": PROMPTS,
            "job": job,
            "store": str(store),
            "shard_size": 5,
            "execution": ExecutionSpec(num_actors=2, torch_threads=1, batch_size=4),
        }
        return JobSpec(**{**base, **fields})

    cache = make(root / "cache", CacheParams(kind="cache", paired=True))
    run_job(cache, keep_actors=True)
    model_run = make(root / "model-atp", atp_params())
    run_job(model_run, keep_actors=True)
    return make, cache.store, read_result(model_run.store)


def atp_params(**fields) -> AttributeParams:
    base = {
        "kind": "attribute",
        "method": "atp",
        "nodes": ["sae_feature", "sae_error"],
        "positions": "all",
        "top_nodes": 100_000,
    }
    return AttributeParams(**{**base, **fields})


def _magnitudes(url: str, names: list[str] | None = None) -> dict[str, float]:
    """Per feature node, the mean over prompts of |a'·g'| + |a·g|: the storage bound's scale.

    ``names``: named positions (default: every position, labelled by index).
    """
    store = FeatureStore.open(url)
    total: dict[str, float] = {}
    having: dict[str, int] = {}
    for shard in sorted(store.committed_shard_ids()):
        offsets = store.prompt_shard(shard).prompt_offsets
        named = store.shard_pairs(shard).named_positions
        labels: dict[int, list[str]] = {}
        for prompt, start in enumerate(offsets[:-1].tolist()):
            n = int(offsets[prompt + 1]) - start
            for q in range(n):
                labels[start + q] = [str(q)] if names is None else []
            for name in names or []:
                labels[start + named[prompt][name]].append(name)
            for label in {label for q in range(n) for label in labels[start + q]}:
                having[label] = having.get(label, 0) + 1
        for site in store.layout.sites:
            clean = store.site_shard(shard, site.label)
            side = store.paired_site_shard(shard, site.label)
            for part in (clean, side):
                assert part.gradients is not None
                tokens = np.repeat(
                    np.arange(len(part.token_offsets) - 1), np.diff(part.token_offsets)
                )
                products = np.abs(part.activations.astype(np.float64) * part.gradients)
                for t, f, v in zip(
                    tokens.tolist(), part.feature_ids.tolist(), products.tolist(), strict=True
                ):
                    for label in labels[t]:
                        key = f"feature:{site.label}:{f}@{label}"
                        total[key] = total.get(key, 0.0) + v
    return {key: v / having[key.rsplit("@", 1)[1]] for key, v in total.items()}


def _close(ours, theirs, scale: float) -> bool:
    """Within the bound of docs/paired_caches.md: (2u + u²)·scale for a feature node (scale:
    its mean |a'g'| + |ag|), float32 rounding for an error node (stored in float32)."""
    slack = 1e-5 * abs(theirs) + 1e-6  # the float32 model's own rounding, either job
    return abs(ours - theirs) <= (2 * U16 + U16**2) * scale + slack


def test_store_fed_atp_equals_the_model_run_job(jobs, tmp_path):
    make, cache_url, expected = jobs
    source = StoreSource(kind="store", url=cache_url)
    spec = make(tmp_path / "from-store", atp_params(verify_top_k=3), prompts=source)
    summary = run_job(spec, keep_actors=True)
    assert summary.shards_run == 3 and summary.actors == 2  # actors only for verification

    result = read_result(spec.store)
    assert (result.kind, result.method, result.n_prompts) == ("attribute", "atp", 12)
    assert result.n_nodes == expected.n_nodes
    ours = {effect.node: effect for effect in result.top}
    theirs = {effect.node: effect for effect in expected.top}
    nonzero = {name for name, e in theirs.items() if e.mean_abs > 1e-9}
    assert nonzero and nonzero <= set(ours)
    assert any(name.startswith("sae_error:") for name in nonzero)
    scale = _magnitudes(cache_url)
    for name in nonzero:
        a, b = ours[name], theirs[name]
        assert a.n_prompts == b.n_prompts, name
        assert _close(a.mean, b.mean, scale.get(name, 0.0)), (name, a.mean, b.mean)
        assert _close(a.mean_abs, b.mean_abs, scale.get(name, 0.0)), name
    top3 = [e.node for e in result.top[:3]]
    assert top3 == [e.node for e in expected.top[:3]]
    assert all(e.verification is not None for e in result.top[:3])
    assert result.n_verified == 3

    again = run_job(spec, keep_actors=True)  # finished: nothing recomputed, result kept
    assert again.shards_run == 0 and read_result(spec.store) == result


def test_store_fed_named_positions_without_a_model(jobs, tmp_path):
    make, cache_url, _ = jobs
    positions = ["IO", "S2", "END"]
    model_run = make(tmp_path / "model", atp_params(positions=positions))
    run_job(model_run, keep_actors=True)
    expected = {e.node: e for e in read_result(model_run.store).top}
    source = StoreSource(kind="store", url=cache_url)
    spec = make(tmp_path / "store", atp_params(positions=positions), prompts=source)
    summary = run_job(spec)
    assert summary.actors == 0  # no verification: no model anywhere
    result = read_result(spec.store)
    assert result.n_nodes == read_result(model_run.store).n_nodes
    scale = _magnitudes(cache_url, positions)
    nonzero = [e for e in expected.values() if e.mean_abs > 1e-9]
    ours = {e.node: e for e in result.top}
    assert nonzero and all(e.node in ours for e in nonzero)
    for other in nonzero:
        effect = ours[other.node]
        assert _close(effect.mean, other.mean, scale.get(other.node, 0.0)), other.node


def test_store_fed_refuses_bad_caches_before_any_work(jobs, tmp_path, tiny_hf_sae_dirs):
    make, cache_url, _ = jobs
    plain = make(tmp_path / "plain", CacheParams(kind="cache", gradients=False))
    plain_store = FeatureStore.create(
        plain.store,
        _layout(plain, gradients=False),
    )
    unpaired = make(tmp_path / "unpaired", CacheParams(kind="cache"))
    FeatureStore.create(unpaired.store, _layout(unpaired, gradients=True))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cache_url, unfinished)
    FeatureStore.open(str(unfinished)).uncommit(1)

    def refused(source: str, match: str, **fields) -> None:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        params = fields.pop("job", atp_params())
        spec = make(out, params, prompts=StoreSource(kind="store", url=source), **fields)
        with pytest.raises(JobError, match=match):
            run_job(spec)
        assert not out.exists()  # nothing was created

    refused(str(tmp_path / "nowhere"), "no cache store")
    refused(plain_store.url, "no gradients")
    refused(unpaired.store, "no corrupted activations")
    refused(cache_url, "metric", metric=MetricSpec(kind="target_logprob"))
    refused(str(unfinished), "not finished: shards \\[1\\]")
    refused(cache_url, "is not one of store", saes=[SAESpec(source=str(tmp_path / "other"))])
    refused(cache_url, "method: atp", job=atp_params(method="atpstar"))
    refused(cache_url, "cannot be scored", job=atp_params(nodes=["sae_feature", "head_z"]))


def _layout(spec: JobSpec, *, gradients: bool):
    from circuitscan.schemas.store import SiteLayout, StoreLayout

    return StoreLayout(
        sites=[SiteLayout(label="L0.resid_post", hook_name="blocks.0.hook_resid_post", d_sae=8)],
        gradients=gradients,
        job_hash=spec.content_hash(),
        job_spec=spec.model_dump(mode="json"),
    )


def test_a_paired_caches_index_ranks_by_the_atp_term(jobs, tmp_path):
    """The merged index's per-feature Σ (a' − a)·g and the error node's Σ equal the
    model-run AtP job's node sums over every position, within the storage bound."""
    from circuitscan.services.store.attribution_index import NoAttributionIndexError
    from circuitscan.services.store.rankings import top_attributions

    _, cache_url, expected = jobs
    store = FeatureStore.open(cache_url)
    scale = _magnitudes(cache_url)
    for site in store.layout.sites:
        index = store.index.attribution(site.label)
        assert index.atp_total is not None and index.error_atp is not None
        want: dict[int, float] = {}
        bound: dict[int, float] = {}
        error = 0.0
        for effect in expected.top:
            kind, _, rest = effect.node.partition(":")
            if kind == "feature" and rest.startswith(f"{site.label}:"):
                feature = int(rest.split(":")[1].split("@")[0])
                want[feature] = want.get(feature, 0.0) + effect.mean * effect.n_prompts
                bound[feature] = bound.get(feature, 0.0) + (
                    scale.get(effect.node, 0.0) * effect.n_prompts
                )
            elif effect.node.startswith(f"sae_error:{site.label}@"):
                error += effect.mean * effect.n_prompts
        live = [f for f, v in want.items() if abs(v) > 1e-9]
        assert live
        for feature in range(site.d_sae):
            got, ref = float(index.atp_total[feature]), want.get(feature, 0.0)
            assert _close(got, ref, bound.get(feature, 0.0) + 2.0**-20), (feature, got, ref)
        assert _close(float(index.error_atp[0]), error, 0.0), (index.error_atp, error)
        ranking = top_attributions(store, site.label, rank_by="atp", n=len(live))
        got_order = [row.feature for row in ranking.rows]
        assert {row.feature for row in ranking.rows} <= set(want)
        assert all(row.atp is not None for row in ranking.rows)
        keys = [abs(float(index.atp_total[f])) for f in got_order]
        assert keys == sorted(keys, reverse=True)
        assert ranking.error_atp == pytest.approx(float(index.error_atp[0]))

    # An index generation of a paired store without the AtP sums (as written before they
    # existed) has no rankings until it is rebuilt, rather than sums missing shards.
    older = tmp_path / "older"
    shutil.copytree(cache_url, older)
    writer = FeatureStore.open(str(older))
    label = writer.layout.sites[0].label
    writer.feature_index(label)
    assert writer.index._attribution is not None
    for item in writer.index._attribution.values():
        item.atp_total = item.atp_total_abs = item.error_atp = None
    writer.flush_index()
    with pytest.raises(NoAttributionIndexError, match="circuitscan repair"):
        top_attributions(FeatureStore.open(str(older)), label, rank_by="atp")
    FeatureStore.open(str(older)).index.rebuild()  # what `circuitscan repair` does
    rebuilt = FeatureStore.open(str(older)).index.attribution(label)
    assert rebuilt.atp_total is not None
    original = store.index.attribution(label)
    assert np.array_equal(rebuilt.atp_total, original.atp_total)


def _kill_estimate_tasks(done: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker process found running an estimate task (by its title)."""
    while not done.is_set() and not killed:
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any("ray::estimate_shard" in part for part in process.info["cmdline"] or []):
                try:
                    os.kill(process.info["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(process.info["pid"])
                return
        time.sleep(0.005)


def test_killing_an_estimate_worker_mid_job_gives_the_identical_result(jobs, tmp_path):
    make, cache_url, _ = jobs
    source = StoreSource(kind="store", url=cache_url)
    reference = make(tmp_path / "reference", atp_params(), prompts=source)
    run_job(reference)
    expected = read_result(reference.store).model_dump(exclude={"job_hash"})
    # A task is short, so the killer may miss every one of a run: each attempt is a new
    # job (its own store) until a kill lands mid-task; the test fails if none ever does.
    for attempt in range(8):
        spec = make(tmp_path / f"killed-{attempt}", atp_params(), prompts=source)
        done, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_estimate_tasks, args=(done, killed))
        killer.start()
        try:
            summary = run_job(spec)
        finally:
            done.set()
            killer.join()
        assert summary.shards_run == summary.shards_total == 3
        assert read_result(spec.store).model_dump(exclude={"job_hash"}) == expected
        if killed:
            break
    assert killed, "no estimate task was caught running in 8 jobs"


def test_store_fed_auto_verification_runs_its_rounds_on_the_actors(jobs, tmp_path):
    """verify_top_k: auto from a store: the store's ranking verified in rounds on the model,
    each verified node's exact value the model-run job's, the rest certified."""
    from circuitscan.schemas.jobs import CertifyParams

    make, cache_url, _ = jobs
    certify = CertifyParams(samples=4, top_k=3, budget=6)
    params = atp_params(verify_top_k="auto", certify=certify, top_nodes=50)
    source = StoreSource(kind="store", url=cache_url)
    spec = make(tmp_path / "auto-store", params, prompts=source)
    summary = run_job(spec, keep_actors=True)
    assert summary.actors == 2
    result = read_result(spec.store)
    auto = result.auto_verification
    assert auto is not None and 3 <= auto.verified <= 6 and result.n_verified == auto.verified
    verified = [e for e in result.top if e.verification is not None]
    assert [e.node for e in verified] == [e.node for e in result.top[: auto.verified]]
    assert auto.stopped_by == "exhausted" or result.certification is not None

    model_run = make(tmp_path / "auto-model", atp_params(verify_top_k=auto.verified))
    run_job(model_run, keep_actors=True)
    exact = {e.node: e.verification for e in read_result(model_run.store).top if e.verification}
    common = [e for e in verified if e.node in exact]
    assert common  # the two rankings share their top nodes
    for effect in common:
        assert effect.verification is not None
        other = exact[effect.node]
        ours = effect.verification
        assert ours.n_prompts == other.n_prompts, effect.node
        assert (ours.exact_mean, ours.exact_mean_abs) == pytest.approx(
            (other.exact_mean, other.exact_mean_abs), rel=1e-5, abs=1e-6
        ), effect.node  # the float32 model's rounding (patching batched differently)


def test_a_corrupted_targeted_scan_from_the_paired_cache_matches_the_full_scan(jobs, tmp_path):
    """ablation_scan mode: corrupted on the actors, full and targeted by the paired cache's AtP
    term: every patched feature's exact values are the full scan's, and so is its top-3."""
    from circuitscan.schemas.jobs import AblationScanParams, ScanCandidates

    make, cache_url, _ = jobs
    full = make(tmp_path / "full", AblationScanParams(kind="ablation_scan", mode="corrupted"))
    run_job(full, keep_actors=True)
    candidates = ScanCandidates(store=cache_url, top_k=3, patience=3, round_size=2)
    params = AblationScanParams(kind="ablation_scan", mode="corrupted", candidates=candidates)
    targeted = make(tmp_path / "targeted", params)
    run_job(targeted, keep_actors=True)
    everything, result = read_result(full.store), read_result(targeted.store)
    assert everything.mode == result.mode == "corrupted" and everything.n_ablations > 0
    exact = {f.feature: (f.mean_delta, f.mean_abs_delta) for f in everything.features}
    info = result.targeted
    assert info is not None and info.n_ablated <= info.n_candidates <= len(exact)
    assert result.n_ablations <= everything.n_ablations
    for f in result.features:
        assert (f.mean_delta, f.mean_abs_delta) == pytest.approx(
            exact[f.feature], rel=1e-5, abs=1e-6
        ), f.feature  # the float32 model's rounding (rows batched differently)
        assert f.estimate_mean_abs is not None
    top = sorted(exact, key=lambda f: (-exact[f][1], f))[:3]
    assert {f.feature for f in result.features[:3]} == set(top)
    # Pair level on the same actors: each feature's exact pairs (its n_exact largest-|estimate|
    # prompts) sum to the full scan's Δm on those prompts, and the rest are the cache's estimates.
    from circuitscan.services.jobs.job_kind import committed_partials
    from circuitscan.services.jobs.kinds.ablation_scan import AblationPartial
    from circuitscan.services.jobs.kinds.targeted_scan import cache_estimates

    pairs = candidates.model_copy(update={"granularity": "pair", "gap": "auto", "patience": 6})
    paired = make(tmp_path / "pairs", params.model_copy(update={"candidates": pairs}))
    run_job(paired, keep_actors=True)
    by_pair = read_result(paired.store)
    assert by_pair.targeted.granularity == "pair"
    assert by_pair.n_ablations == by_pair.targeted.n_ablated < everything.n_ablations
    full_delta: dict[tuple[int, int], float] = {}
    start = 0
    for part in committed_partials(FeatureStore.open(full.store), AblationPartial):
        dense = np.nan_to_num(part.dense_delta())
        for column, feature in enumerate(part.features.tolist()):
            for row in range(dense.shape[0]):
                full_delta[(start + row, feature)] = float(dense[row, column])
        start += dense.shape[0]
    est = cache_estimates(pairs, by_pair.site, "last", "corrupted", keep_pairs=True)
    n = by_pair.n_prompts
    for f in by_pair.features:
        mine = np.flatnonzero(est.pair_feature == f.feature)
        mine = mine[np.lexsort((est.pair_prompt[mine], -np.abs(est.pair_estimate[mine])))]
        done, rest = mine[: f.n_exact], mine[f.n_exact :]
        exact_part = f.mean_delta * n - float(est.pair_estimate[rest].sum())
        expected = sum(full_delta.get((int(est.pair_prompt[p]), f.feature), 0.0) for p in done)
        assert exact_part == pytest.approx(expected, rel=1e-5, abs=1e-6), f.feature
        assert f.n_exact <= f.n_active
    assert {f.feature for f in by_pair.features[:3]} == set(top)
