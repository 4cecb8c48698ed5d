"""Scan jobs end to end on real local Ray: the tiny HF Llama, its SAEs, Zarr stores on disk.

One Ray instance serves the module; in-process jobs reuse their worker actors
(``keep_actors``) so only the first job pays for loading the model in workers.
CLI tests run the real ``circuitscan`` process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from breakdown_checks import (
    assert_cells,
    check_ablation_per_prompt,
    check_attribute_per_prompt,
    check_breakdown,
    check_dfa_per_prompt,
    check_splice_per_prompt,
    check_verified_per_prompt,
    group_means,
)

from circuitscan.schemas.jobs import (
    CacheParams,
    DatasetSource,
    ExecutionSpec,
    IOISource,
    JobSpec,
    JsonlSource,
)
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.ray_pool import acquire_actors, describe
from circuitscan.services.jobs.runner import JobError, resume_job, run_job
from circuitscan.services.store import FeatureStore, feature_summary, features_at, top_examples

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "circuitscan.services.cli"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def make_spec(tiny_hf_model_dir, tiny_hf_sae_dirs):
    def make(store: Path, **fields) -> JobSpec:
        base = {
            "name": "tiny",
            "model": ModelSpec(source=str(tiny_hf_model_dir)),
            "saes": [SAESpec(source=str(path)) for path in tiny_hf_sae_dirs],
            "prompts": IOISource(kind="ioi", n=12, seed=1),
            "job": CacheParams(kind="cache"),
            "store": str(store),
            "shard_size": 3,
            "execution": ExecutionSpec(num_actors=2, torch_threads=1, batch_size=4),
        }
        return JobSpec(**{**base, **fields})

    return make


def _digests(url: str) -> dict[int, str]:
    store = FeatureStore.open(url)
    return {sid: entry.digest() for sid, entry in store.committed_entries().items()}


def _stored_texts(url: str) -> list[str]:
    store = FeatureStore.open(url)
    return [
        r.text for sid in sorted(store.committed_shard_ids()) for r in store.prompt_records(sid)
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# --- a cache job, in process ----------------------------------------------------------


def test_cache_job_commits_a_queryable_store(local_ray, make_spec, tmp_path):
    spec = make_spec(tmp_path / "store")
    summary = run_job(spec, keep_actors=True)

    assert (summary.prompts, summary.shards_total, summary.shards_run) == (12, 4, 4)
    assert (summary.rejected, summary.truncated, summary.retries) == (0, 0, 0)
    store = FeatureStore.open(spec.store)
    assert store.committed_shard_ids() == {0, 1, 2, 3}
    assert store.n_prompts() == 12 and store.n_tokens() == summary.tokens
    assert store.layout.job_hash == spec.content_hash()
    assert sum(summary.nodes.values()) == 4

    active = features_at(store, "L0.resid_post", prompt=5, position=3)
    assert active.feature_ids and active.gradients is not None
    feature = active.feature_ids[0]
    examples = top_examples(store, "L0.resid_post", feature, n=3)
    assert examples and examples[0].activation >= examples[-1].activation
    assert feature_summary(store, "L0.resid_post", feature).count >= 1

    again = run_job(spec, keep_actors=True)  # everything committed: nothing recomputed
    assert (again.shards_run, again.shards_reused) == (0, 4)
    assert _digests(spec.store) == {sid: e.digest() for sid, e in store.committed_entries().items()}


def test_overlong_prompts_are_rejected_or_truncated_and_counted(local_ray, make_spec, tmp_path):
    short = ["The cat sat on the mat.", "A dog ran.", "Birds sing in spring."]
    long = ["word " * 40, "another rather long prompt " * 10]
    source = JsonlSource(kind="jsonl", path=str(_write_jsonl(tmp_path / "p.jsonl", short + long)))
    cache = CacheParams(kind="cache", gradients=False)
    common = {"prompts": source, "job": cache, "max_prompt_tokens": 12, "shard_size": 2}

    rejected = run_job(make_spec(tmp_path / "reject", **common), keep_actors=True)
    assert (rejected.prompts, rejected.rejected, rejected.truncated) == (3, 2, 0)
    assert _stored_texts(str(tmp_path / "reject")) == short

    spec = make_spec(tmp_path / "cut", overlong="truncate", **common)
    truncated = run_job(spec, keep_actors=True)
    assert (truncated.prompts, truncated.rejected, truncated.truncated) == (5, 0, 2)
    store = FeatureStore.open(spec.store)
    lengths = [len(store.prompt_tokens(i)) for i in range(5)]
    assert max(lengths) == 12 and lengths[3] == lengths[4] == 12


def test_store_holding_another_job_is_refused(local_ray, make_spec, tmp_path):
    first = make_spec(tmp_path / "store", prompts=IOISource(kind="ioi", n=3, seed=1))
    run_job(first, keep_actors=True)
    before = _digests(first.store)
    other = make_spec(tmp_path / "store", prompts=IOISource(kind="ioi", n=3, seed=2))
    with pytest.raises(JobError, match="already holds a different job"):
        run_job(other, keep_actors=True)
    assert _digests(first.store) == before


def test_empty_prompt_set_is_an_error(make_spec, tmp_path):
    source = JsonlSource(kind="jsonl", path=str(_write_jsonl(tmp_path / "e.jsonl", [])))
    with pytest.raises(JobError, match="empty"):
        run_job(make_spec(tmp_path / "store", prompts=source))
    assert not (tmp_path / "store").exists()


# --- fault tolerance -------------------------------------------------------------------


def _wait_for_commits(store: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manifest = store / "manifest"
        if manifest.is_dir() and len(list(manifest.glob("*.json"))) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} shards committed in {store} after {timeout}s")


def test_killed_worker_actor_shards_are_retried(local_ray, make_spec, tmp_path):
    fields = {
        "prompts": IOISource(kind="ioi", n=16, seed=3),
        "shard_size": 1,
        "job": CacheParams(kind="cache", gradients=False),
    }
    reference = make_spec(tmp_path / "reference", **fields)
    run_job(reference, keep_actors=True)

    spec = make_spec(tmp_path / "killed", **fields)
    # The job reuses these pooled actors, so their pids are the processes to kill.
    actors = acquire_actors(spec, 2, use_gpu=False, reuse=True)
    pids = {describe(actor).pid for actor in actors}
    victim = sorted(pids)[0]

    def kill_after_first_commit() -> None:
        _wait_for_commits(tmp_path / "killed", 1, timeout=120)
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_commit)
    killer.start()
    summary = run_job(spec, keep_actors=True)
    killer.join()

    assert summary.shards_run == summary.shards_total == 16
    assert set(summary.pids) - pids, "no shard ran on the restarted worker"
    assert summary.retries >= 1, "a shard rerun on the restarted worker is not counted"
    assert _digests(spec.store) == _digests(reference.store)
    assert _stored_texts(spec.store) == _stored_texts(reference.store)


def test_killed_driver_then_resume_recomputes_only_uncommitted(make_spec, tmp_path, local_ray):
    fields = {
        "prompts": IOISource(kind="ioi", n=24, seed=4),
        "shard_size": 1,
        "job": CacheParams(kind="cache", gradients=False),
        "execution": ExecutionSpec(num_actors=1, torch_threads=1, batch_size=4),
    }
    reference = make_spec(tmp_path / "reference", **fields)
    run_job(reference, keep_actors=True)

    spec = make_spec(tmp_path / "store", **fields)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json(), encoding="utf-8")
    driver = subprocess.Popen(
        [*CLI, "run", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,  # its embedded Ray lives in this process group
    )
    try:
        _wait_for_commits(tmp_path / "store", 1, timeout=240)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the killed driver's own Ray processes
    committed = set(_digests(spec.store))
    assert 1 <= len(committed) < 24, "the kill did not land mid-job"

    # Another driver (this process, on the module's warm workers: the killed driver's
    # own process is what had to be real) takes over the dead driver's lease and resumes.
    notes: list[str] = []
    resumed = resume_job(spec.store, echo=notes.append, keep_actors=True)
    assert (resumed.shards_run, resumed.shards_reused) == (24 - len(committed), len(committed))
    assert any("took over the stale writer lease" in note for note in notes), notes
    assert _digests(spec.store) == _digests(reference.store)
    assert _stored_texts(spec.store) == _stored_texts(reference.store)


def test_resume_trusts_committed_entries_and_verify_recomputes_a_damaged_shard(
    make_spec, tmp_path, local_ray
):
    from circuitscan.services.store import CorruptShardError
    from circuitscan.services.store.shard_io import shard_prefix
    from circuitscan.services.store.shard_pack import PACK_NAME
    from circuitscan.testing.corruption import damage, member_key

    fields = {
        "prompts": IOISource(kind="ioi", n=6, seed=5),
        "shard_size": 2,
        "job": CacheParams(kind="cache", gradients=False),
        "execution": ExecutionSpec(num_actors=1, torch_threads=1, batch_size=4),
    }
    spec = make_spec(tmp_path / "store", **fields)
    run_job(spec, keep_actors=True)
    digests = _digests(spec.store)
    entry = FeatureStore.open(spec.store).committed_entries()[1]
    chunk = next(key for key in sorted(entry.checksums) if "/feature_ids/c/" in key)
    path = Path(spec.store) / shard_prefix(1) / PACK_NAME
    data = path.read_bytes()
    damage(Path(spec.store), member_key(1, chunk), "flip")  # same size: only checksums tell

    # By default committed shards are trusted by their entries: nothing is read back or redone,
    # and the damage is still caught where the shard is read.
    trusted = run_job(spec, keep_actors=True)
    assert (trusted.shards_run, trusted.shards_reused, trusted.shards_recomputed_corrupt) == (
        0,
        3,
        0,
    )
    assert path.read_bytes() != data
    label = chunk.split("/")[1]  # sites/LABEL/feature_ids/c/N
    with pytest.raises(CorruptShardError, match="resume --verify"):
        features_at(FeatureStore.open(spec.store), label, 2, 0)

    # What `circuitscan resume --verify` runs and prints, on this module's warm workers.
    verified = resume_job(spec.store, verify=True, keep_actors=True)
    assert "ran 1, reused 2, recomputed corrupt 1" in verified.render()
    assert path.read_bytes() == data
    assert _digests(spec.store) == digests


def test_repair_restores_damaged_shards_entries_and_results_byte_for_byte(
    make_spec, tmp_path, local_ray
):
    """``circuitscan repair`` on real jobs' stores, each damaged in several places at once:
    every file of the repaired store is the undamaged store's, byte for byte.

    Only the writer lease (``lease.json``) is left out of the comparison: it exists
    only while a writer runs (and names that writer's pid, host and time), and both
    stores have none once their writer is done. Nothing else is run-specific: shard
    bytes, manifest entries, the content-named index, the job record, the prompts'
    digests and the result documents hold no timestamps, pids or hosts.
    """
    import shutil

    from typer.testing import CliRunner

    from circuitscan.schemas.jobs import AttributeParams
    from circuitscan.services.cli import app
    from circuitscan.services.jobs.repair import repair_store
    from circuitscan.testing.corruption import damage, member_key, store_files

    execution = ExecutionSpec(num_actors=1, torch_threads=1, batch_size=4)
    cache = make_spec(
        tmp_path / "cache",
        prompts=IOISource(kind="ioi", n=6, seed=6),
        shard_size=2,
        execution=execution,
    )
    attribute = make_spec(
        tmp_path / "attribute",
        prompts=IOISource(kind="ioi", n=4, seed=6),
        shard_size=2,
        execution=execution,
        job=AttributeParams(kind="attribute", method="atp", nodes=["z"], verify_top_k=2),
    )
    site = "L0.resid_post"
    damages = {
        cache.store: [
            (member_key(0, f"sites/{site}/activations/c/0"), "truncate"),  # shard chunk
            (member_key(2, f"sites/{site}/feature_ids/zarr.json"), "flip"),  # shard metadata
            ("manifest/000001.json", "truncate"),  # manifest entry
        ],
        attribute.store: [
            ("results/attribute.json", "delete"),  # a result document the job wrote
            ("results/attribute/verify_delta.npy.zst", "flip"),  # its per-prompt array
            ("manifest/000000.json", "flip"),
        ],
    }
    runner = CliRunner()
    for spec in (cache, attribute):
        run_job(spec, keep_actors=True)
        pristine = Path(f"{spec.store}-pristine")
        shutil.copytree(spec.store, pristine)
        store = Path(spec.store)
        for key, how in damages[spec.store]:
            assert (store / key.partition("#")[0]).is_file(), key
            damage(store, key, how)
        found = runner.invoke(app, ["verify", spec.store])
        assert found.exit_code == 3, found.output
        for key, _how in damages[spec.store]:
            assert key.split("/")[-1] in found.output or key.split("/")[1] in found.output, key
        # What `circuitscan repair` runs, on this module's warm workers.
        said: list[str] = []
        assert repair_store(spec.store, echo=said.append, keep_actors=True).ok, said
        assert "resuming the job to recompute what is damaged" in said, said
        before, after = store_files(pristine), store_files(store)
        assert sorted(after) == sorted(before)
        assert [key for key in sorted(before) if before[key] != after[key]] == []
        assert runner.invoke(app, ["verify", spec.store]).exit_code == 0
    # The index was rebuilt over the recomputed shards (the cache store has one).
    assert any(key.startswith("index/") for key in store_files(Path(cache.store)))


# --- bad input through the CLI ---------------------------------------------------------


def _cli_in_process(*args: str):
    """The CLI run in this process (what a user sees: exit status, stdout, stderr)."""
    from typer.testing import CliRunner

    from circuitscan.services.cli import app

    result = CliRunner().invoke(app, list(args))
    # Only typer.Exit (SystemExit) may end the command: any other exception is a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_cli_reports_a_store_it_cannot_use_without_traceback(make_spec, tmp_path):
    """A store the medium refuses (a path under a file; object storage with no
    credentials) is named with the medium's reason and exit status 2, not a traceback."""
    (tmp_path / "file").write_text("mine")
    source = JsonlSource(kind="jsonl", path=str(_write_jsonl(tmp_path / "p.jsonl", ["Hi there."])))
    spec = tmp_path / "under-a-file.json"
    loss = MetricSpec(kind="next_token_loss")
    target = tmp_path / "file" / "store"
    spec.write_text(make_spec(target, prompts=source, metric=loss).model_dump_json())
    refused = _cli_in_process("run", str(spec))
    assert refused.returncode == 2, refused.stderr
    assert f"cannot write to local directory {target}" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and (tmp_path / "file").read_text() == "mine"

    # A memory:// store lives in one process: the job's actors would each see their own.
    private = tmp_path / "memory.json"
    private.write_text(
        make_spec("memory://jobs-private", prompts=source, metric=loss).model_dump_json()
    )
    alone = _cli_in_process("run", str(private))
    assert alone.returncode == 2 and "only this process can reach" in alone.stderr, alone.stderr

    env = _env()
    for name in list(env):
        if name.startswith("AWS_") or name == "CIRCUITSCAN_S3_ENDPOINT":
            env.pop(name)
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata lookup: none here
    )
    query = [*CLI, "query", "s3://bucket/prefix", "summary"]
    no_credentials = subprocess.run(query, capture_output=True, text=True, timeout=300, env=env)
    assert no_credentials.returncode == 2, no_credentials.stderr
    assert "cannot read from object storage s3://bucket/prefix" in no_credentials.stderr
    assert "credentials" in no_credentials.stderr and "Traceback" not in no_credentials.stderr


def test_cli_reports_bad_input_without_traceback(make_spec, tmp_path):
    """Mistakes found before Ray starts, through the CLI in process; the unreachable
    cluster through a real CLI process (its exit status and stderr as a shell sees them)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprompts: {kind: ioi, n: 0}\njob: {kind: cash}\nshard_size: -1\n")
    invalid = _cli_in_process("run", str(bad))
    assert invalid.returncode != 0
    for path in ("prompts.ioi.n", "job", "store", "shard_size"):
        assert path in invalid.stderr, invalid.stderr
    assert "Traceback" not in invalid.stderr

    source = JsonlSource(kind="jsonl", path=str(_write_jsonl(tmp_path / "p.jsonl", ["Hi there."])))
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(make_spec(tmp_path / "store", prompts=source).model_dump_json())
    no_answers = _cli_in_process("run", str(unlabelled))  # the default metric is logit_diff
    assert no_answers.returncode != 0
    assert "metric logit_diff needs the 'answer' label on every prompt" in no_answers.stderr
    assert "Traceback" not in no_answers.stderr and not (tmp_path / "store").exists()

    good = tmp_path / "good.json"
    loss = MetricSpec(kind="next_token_loss")
    good.write_text(make_spec(tmp_path / "store", prompts=source, metric=loss).model_dump_json())
    unreachable = _cli("run", str(good), "--address", "127.0.0.1:9")
    assert unreachable.returncode != 0
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr

    empty = tmp_path / "empty.json"
    empty_source = JsonlSource(kind="jsonl", path=str(_write_jsonl(tmp_path / "e.jsonl", [])))
    empty.write_text(make_spec(tmp_path / "store", prompts=empty_source).model_dump_json())
    result = _cli_in_process("run", str(empty))
    assert result.returncode != 0 and "prompt set is empty" in result.stderr
    assert "Traceback" not in result.stderr


# --- attribute, ablation_scan and splice_eval kinds ------------------------------------


@pytest.fixture(scope="module")
def direct(tiny_hf_model_dir, tiny_hf_sae_dirs):
    """The same model, SAEs and prompts in this process, for the pipelines' direct output."""
    from circuitscan.pipelines.batching import tokenize_prompts
    from circuitscan.services.jobs.prompt_sources import load_prompts
    from circuitscan.services.model_loading import load_model, load_tokenizer
    from circuitscan.services.sae_loading import load_sae

    spec = ModelSpec(source=str(tiny_hf_model_dir))
    model = load_model(spec).model
    saes = [load_sae(SAESpec(source=str(path)), model) for path in tiny_hf_sae_dirs]
    records = load_prompts(KIND_PROMPTS, lambda: load_tokenizer(spec))
    clean = tokenize_prompts(model, records)
    corrupt = tokenize_prompts(model, [r.model_copy(update={"text": r.corrupted}) for r in records])
    return model, {s.site.label: s for s in saes}, records, clean, corrupt


KIND_PROMPTS = IOISource(kind="ioi", n=10, seed=5)


def test_attribute_job_matches_the_pipeline_and_verifies_top_nodes(
    local_ray, make_spec, direct, tmp_path
):
    from circuitscan.pipelines.attribution import exact_patch, run_atp
    from circuitscan.schemas.attribution import Node
    from circuitscan.schemas.jobs import AttributeParams
    from circuitscan.services.jobs.kinds.attribute import attribution_method, node_selection
    from circuitscan.services.store.results import list_results, read_result, top_nodes

    params = AttributeParams(
        kind="attribute",
        method="atpstar",
        nodes=["sae_feature", "head_z", "head_q", "head_k"],
        positions="all",
        verify_top_k=4,
        top_nodes=100_000,
    )
    spec = make_spec(tmp_path / "attr", prompts=KIND_PROMPTS, job=params)
    summary = run_job(spec, keep_actors=True)
    assert (summary.prompts, summary.shards_run) == (10, 4)

    model, saes, records, clean, corrupt = direct
    sae_map = {label: loaded.sae for label, loaded in saes.items()}
    named = [r.positions for r in records]
    expected = run_atp(
        model, sae_map, clean.tokens, corrupt.tokens, clean.lengths, spec.metric,
        clean.answer, clean.wrong, node_selection(params), method=attribution_method(params),
        named_positions=named, corrupt_lengths=corrupt.lengths,
    )  # fmt: skip
    names = [str(node) for node in expected.nodes()]
    means, means_abs = expected.mean().tolist(), expected.mean_abs().tolist()

    result = read_result(spec.store)
    assert result.kind == "attribute" and result.n_prompts == 10
    assert result.n_nodes == len(names)
    stored = {effect.node: effect for effect in result.top}
    assert set(stored) == {n for n, m in zip(names, means, strict=True) if m == m}  # NaN-free
    for name, mean, mean_abs in zip(names, means, means_abs, strict=True):
        if name in stored:
            assert stored[name].mean == pytest.approx(mean, rel=1e-4, abs=1e-6)
            assert stored[name].mean_abs == pytest.approx(mean_abs, rel=1e-4, abs=1e-6)

    top = top_nodes(spec.store, k=4)
    totals = [t.mean_abs * t.n_prompts for t in top]
    assert totals == sorted(totals, reverse=True)
    assert all(t.verification is not None for t in top)
    assert result.n_verified == 4 and top_nodes(spec.store, k=5)[4].verification is None
    exact = exact_patch(
        model, sae_map, clean.tokens, clean.lengths, spec.metric, clean.answer, clean.wrong,
        [Node.parse(t.node) for t in top], mode="corrupt", corrupt_tokens=corrupt.tokens,
        corrupt_lengths=corrupt.lengths, named_positions=named,
    )  # fmt: skip
    for column, effect in enumerate(top):
        assert effect.verification is not None
        truth = exact[:, column].nanmean().item()
        assert effect.verification.exact_mean == pytest.approx(truth, rel=1e-4, abs=1e-6)
    assert [info.kind for info in list_results(spec.store)] == ["attribute"]

    # Per-prompt values kept in the shards (and, for the verified nodes, beside the result)
    # are the pipeline's, sum to the stored aggregates, and break down by template.
    estimates = expected.per_prompt_signed().double().numpy()
    check_attribute_per_prompt(spec.store, estimates, names)
    check_verified_per_prompt(spec.store, exact.double().numpy(), spec.shard_size)
    column = {name: i for i, name in enumerate(names)}
    check_breakdown(
        spec.store,
        "template",
        [r.template for r in records],
        {
            "estimate": {t.node: estimates[:, column[t.node]] for t in result.top[:6]},
            "exact": {t.node: exact[:, i].double().numpy() for i, t in enumerate(top)},
        },
    )

    again = run_job(spec, keep_actors=True)  # finished job: nothing recomputed, result kept
    assert again.shards_run == 0 and read_result(spec.store) == result


def test_attribute_job_certifies_the_unverified_nodes_as_the_pipeline_does(
    local_ray, make_spec, direct, tmp_path
):
    from circuitscan.pipelines.attribution import certify
    from circuitscan.schemas.attribution import Node
    from circuitscan.schemas.jobs import AttributeParams, CertifyParams
    from circuitscan.services.store.results import read_result

    params = AttributeParams(
        kind="attribute", method="atpstar", nodes=["head_z"], positions=["IO", "S2", "END"],
        verify_top_k=3, top_nodes=100_000, certify=CertifyParams(samples=12, p=0.3, seed=4),
    )  # fmt: skip
    spec = make_spec(tmp_path / "certify", prompts=KIND_PROMPTS, job=params)
    run_job(spec, keep_actors=True)
    result = read_result(spec.store)
    bound = result.certification
    assert bound is not None and bound.samples == 12 and bound.confidence == 0.95
    verified = {e.node for e in result.top if e.verification is not None}
    rest = sorted({e.node for e in result.top} - verified)
    assert len(verified) == 3 and bound.n_nodes == len(rest) == result.n_nodes - 3

    model, saes, records, clean, corrupt = direct
    expected = certify(
        model, {label: loaded.sae for label, loaded in saes.items()}, clean.tokens,
        clean.lengths, spec.metric, clean.answer, clean.wrong, [Node.parse(n) for n in rest],
        samples=12, p=0.3, seed=4, corrupt_tokens=corrupt.tokens,
        corrupt_lengths=corrupt.lengths, named_positions=[r.positions for r in records],
        union_size=len(rest) * 10,
    )  # fmt: skip
    assert bound.theta == pytest.approx(expected.theta, rel=1e-4)
    assert (bound.closest_node, bound.binding_node) == (
        expected.closest_node,
        expected.binding_node,
    )
    got = {n.node: n for n in bound.nodes}
    for node in expected.nodes:
        assert got[node.node].estimate == pytest.approx(node.estimate, rel=1e-4, abs=1e-6)
        assert got[node.node].upper == pytest.approx(node.upper, rel=1e-4, abs=1e-6)
    assert result.certified == bound.statement()


def test_attribute_job_verifies_until_certified_as_the_pipeline_does(
    local_ray, make_spec, direct, tmp_path
):
    """verify_top_k: auto through a Ray job: the same rounds, stop and bound as the pipeline."""
    from circuitscan.pipelines.attribution.certify import verify_until_certified
    from circuitscan.schemas.attribution import Node
    from circuitscan.schemas.jobs import AttributeParams, CertifyParams
    from circuitscan.services.store.results import read_result

    certify = CertifyParams(samples=12, p=0.3, seed=4, top_k=2, budget=6)
    params = AttributeParams(
        kind="attribute", method="atpstar", nodes=["head_z"], positions=["IO", "S2", "END"],
        verify_top_k="auto", top_nodes=100_000, certify=certify,
    )  # fmt: skip
    spec = make_spec(tmp_path / "auto", prompts=KIND_PROMPTS, job=params)
    run_job(spec, keep_actors=True)
    result = read_result(spec.store)
    auto = result.auto_verification
    assert auto is not None and result.n_verified == auto.verified
    ranked = [Node.parse(e.node) for e in result.top]
    assert all(e.verification is not None for e in result.top[: auto.verified])
    assert all(e.verification is None for e in result.top[auto.verified :])

    model, saes, records, clean, corrupt = direct
    exact, bound, expected = verify_until_certified(
        model, {label: loaded.sae for label, loaded in saes.items()}, clean.tokens,
        clean.lengths, spec.metric, clean.answer, clean.wrong, ranked, top_k=2, samples=12,
        p=0.3, seed=4, budget=6, corrupt_tokens=corrupt.tokens,
        corrupt_lengths=corrupt.lengths, named_positions=[r.positions for r in records],
    )  # fmt: skip
    assert (auto.stopped_by, auto.verified, auto.rounds, auto.max_rounds) == (
        expected.stopped_by, expected.verified, expected.rounds, expected.max_rounds,
    )  # fmt: skip
    assert auto.smallest_top_effect == pytest.approx(expected.smallest_top_effect, rel=1e-4)
    assert auto.forward_passes == expected.forward_passes
    for column, effect in enumerate(result.top[: auto.verified]):
        assert effect.verification is not None
        truth = exact[:, column].nanmean().item()
        assert effect.verification.exact_mean == pytest.approx(truth, rel=1e-4, abs=1e-6)
    if bound is None:
        assert result.certification is None and auto.theta is None
    else:
        assert result.certification is not None and auto.theta is not None
        assert auto.theta == pytest.approx(bound.theta, rel=1e-4)
        assert result.certification.confidence == pytest.approx(bound.confidence)
        assert result.certification.closest_node == bound.closest_node
    assert result.verified_complete == auto.statement()


def test_attribute_job_pairs_longer_corruptions_from_the_end(
    local_ray, make_spec, direct, tmp_path
):
    """Corrupted prompts with an extra preamble (longer in tokens): align 'end' scores
    them like the pipeline with an end-aligned position map; 'same' refuses them."""
    from circuitscan.pipelines.attribution import run_atp
    from circuitscan.pipelines.attribution.positions import end_aligned_map
    from circuitscan.pipelines.batching import tokenize_prompts
    from circuitscan.schemas.jobs import AttributeParams, JsonlSource
    from circuitscan.services.jobs.kinds.attribute import attribution_method, node_selection
    from circuitscan.services.store.results import read_result

    model, saes, records, clean, _ = direct
    longer = [r.model_copy(update={"corrupted": "So, later on, " + r.corrupted}) for r in records]
    source = tmp_path / "longer.jsonl"
    source.write_text("".join(r.model_dump_json() + "\n" for r in longer))
    params = AttributeParams(
        kind="attribute", method="atpstar", nodes=["head_z", "head_k", "sae_feature"],
        positions=["IO", "S2", "END"], align="end", top_nodes=100_000,
    )  # fmt: skip
    spec = make_spec(tmp_path / "end", prompts=JsonlSource(kind="jsonl", path=str(source)),
                     job=params)  # fmt: skip
    run_job(spec, keep_actors=True)

    corrupt = tokenize_prompts(model, [r.model_copy(update={"text": r.corrupted}) for r in longer])
    assert bool((corrupt.lengths > clean.lengths).all())
    expected = run_atp(
        model, {label: loaded.sae for label, loaded in saes.items()}, clean.tokens,
        corrupt.tokens, clean.lengths, spec.metric, clean.answer, clean.wrong,
        node_selection(params), method=attribution_method(params),
        named_positions=[r.positions for r in records], corrupt_lengths=corrupt.lengths,
        position_map=end_aligned_map(clean.lengths, corrupt.lengths, clean.tokens.shape[1]),
    )  # fmt: skip
    stored = {effect.node: effect for effect in read_result(spec.store).top}
    means = dict(zip((str(n) for n in expected.nodes()), expected.mean().tolist(), strict=True))
    assert set(stored) == {name for name, mean in means.items() if mean == mean}
    for name, effect in stored.items():
        assert effect.mean == pytest.approx(means[name], rel=1e-4, abs=1e-6)
    assert max(abs(e.mean) for e in stored.values()) > 1e-3

    same = make_spec(
        tmp_path / "same", prompts=JsonlSource(kind="jsonl", path=str(source)),
        job=params.model_copy(update={"align": "same"}),
    )  # fmt: skip
    from circuitscan.services.jobs.spec_checks import JobError

    # Found on the driver from the tokenizer, before any shard runs: no store is made.
    with pytest.raises(JobError, match=r"different token lengths.*align: end"):
        run_job(same, keep_actors=True)
    assert not (tmp_path / "same").exists()


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_scan_job_matches_the_pipeline(local_ray, make_spec, direct, tmp_path, mode):
    """Sharded over actors, the scan equals one pass over every prompt; mean ablation
    takes its values from the job's reference prompts in every shard. The prompts come
    from a dataset on disk whose extra columns (kept with meta_columns) break it down."""
    from circuitscan.pipelines.attribution import ablation_scan
    from circuitscan.pipelines.attribution.ablation_scan import reference_slots
    from circuitscan.schemas.jobs import AblationScanParams
    from circuitscan.services.store.results import ablation_deltas, read_result

    params = AblationScanParams(
        kind="ablation_scan", site="L1.z", mode=mode, positions="last", reference_prompts=6
    )
    model, saes, records, clean, _ = direct
    spec = make_spec(
        tmp_path / f"scan-{mode}", prompts=_labelled_dataset(tmp_path, records), job=params
    )
    run_job(spec, keep_actors=True)

    sae, site = saes["L1.z"].sae, saes["L1.z"].site
    reference = None
    if mode == "mean":
        reference = reference_slots(model, sae, site, clean.tokens[:6], clean.lengths[:6], "last")
    scan = ablation_scan(
        model, sae, site, clean.tokens, clean.lengths, spec.metric,
        clean.answer, clean.wrong, mode=mode, positions="last",
        named_positions=[r.positions for r in records], reference=reference,
    )  # fmt: skip
    defined = ~scan.delta.isnan()
    means = scan.delta.nan_to_num(0).sum(0) / defined.sum(0)
    expected = dict(zip(scan.features.tolist(), means.tolist(), strict=True))
    counts = dict(zip(scan.features.tolist(), defined.sum(0).tolist(), strict=True))
    deltas = ablation_deltas(spec.store)
    assert {d.feature for d in deltas} == set(expected)
    for delta in deltas:
        assert delta.site == "L1.z"
        assert delta.n_prompts == (10 if mode == "zero" else counts[delta.feature])
        assert delta.mean_delta == pytest.approx(expected[delta.feature], rel=1e-4, abs=1e-6)
    assert [d.mean_abs_delta for d in deltas] == sorted(
        (d.mean_abs_delta for d in deltas), reverse=True
    )
    result = read_result(spec.store, "ablation_scan")
    assert result.n_ablations == scan.n_ablations
    assert result.baseline_mean == pytest.approx(scan.baseline.mean().item(), rel=1e-4)
    delta = scan.delta.double().numpy()
    if mode == "zero":  # every prompt counts (an inactive feature's Δm is 0)
        delta = np.nan_to_num(delta)
    check_ablation_per_prompt(spec.store)
    per_feature = {"delta": {str(f): delta[:, c] for c, f in enumerate(scan.features.tolist())}}
    check_breakdown(spec.store, "family", [r.template for r in records], per_feature)
    words = [str(len(r.text.split()) % 3) for r in records]  # an integer column, as labels
    assert len(set(words)) > 1
    check_breakdown(spec.store, "words", words, per_feature)
    if mode == "mean":  # a per-shard reference would have given other values
        own = ablation_scan(
            model, sae, site, clean.tokens[:3], clean.lengths[:3], spec.metric,
            clean.answer[:3], clean.wrong[:3], mode="mean", positions="last",
        )  # fmt: skip
        assert not torch.allclose(
            own.delta.nan_to_num(0), scan.delta[:3][:, _columns(scan, own)].nan_to_num(0)
        )


def _labelled_dataset(tmp_path: Path, records) -> DatasetSource:
    """The records as a dataset on disk, with two extra columns kept as labels."""
    import datasets

    path = tmp_path / "labelled-dataset"
    if not path.exists():
        datasets.Dataset.from_dict(
            {
                "prompt": [r.text for r in records],
                "answer": [r.answer for r in records],
                "wrong": [r.wrong for r in records],
                "family": [r.template for r in records],
                "words": [len(r.text.split()) % 3 for r in records],
            }
        ).save_to_disk(str(path))
    return DatasetSource(
        kind="dataset", path=str(path), text_column="prompt", answer_column="answer",
        wrong_column="wrong", meta_columns=["family", "words"],
    )  # fmt: skip


def _columns(scan, part) -> list[int]:
    where = {f: c for c, f in enumerate(scan.features.tolist())}
    return [where[f] for f in part.features.tolist()]


def test_targeted_ablation_scan_job_ablates_on_the_actors_what_the_full_scan_measures(
    local_ray, make_spec, direct, tmp_path
):
    """Candidates from a cache job's store, ablated in rounds on the actors: each ablated
    feature's exact Δm is the full scan's, and the stopped top-K is the full scan's."""
    from circuitscan.pipelines.attribution import ablation_scan
    from circuitscan.schemas.jobs import AblationScanParams, ScanCandidates
    from circuitscan.services.store.results import read_result

    cache = make_spec(tmp_path / "cache", prompts=KIND_PROMPTS)
    run_job(cache, keep_actors=True)
    candidates = ScanCandidates(store=cache.store, top_k=3, patience=4, round_size=3)
    params = AblationScanParams(
        kind="ablation_scan", site="L1.z", positions="last", candidates=candidates
    )
    spec = make_spec(tmp_path / "targeted", prompts=KIND_PROMPTS, job=params)
    run_job(spec, keep_actors=True)

    model, saes, _, clean, _ = direct
    sae, site = saes["L1.z"].sae, saes["L1.z"].site
    full = ablation_scan(
        model, sae, site, clean.tokens, clean.lengths, spec.metric, clean.answer, clean.wrong,
        positions="last",
    )  # fmt: skip
    exact = {
        f: (float(full.delta[:, c].mean()), float(full.delta[:, c].abs().mean()))
        for c, f in enumerate(full.features.tolist())
    }
    result = read_result(spec.store, "ablation_scan")
    info = result.targeted
    assert info is not None and info.n_candidates == len(exact)
    assert info.full_scan_ablations == full.n_ablations
    assert 0 < info.n_ablated < info.n_candidates and info.stop_rule == "patience"
    for f in result.features:
        assert f.mean_delta == pytest.approx(exact[f.feature][0], rel=1e-4, abs=1e-6)
        assert f.estimate_mean_abs is not None
    top = sorted(exact, key=lambda f: -exact[f][1])[:3]
    assert [f.feature for f in result.features[:3]] == top
    assert result.n_ablations < full.n_ablations
    shown = _cli("results", spec.store, "--top", "3")
    assert shown.returncode == 0, shown.stderr
    assert f"targeted by {cache.store}: {info.n_ablated} of {info.n_candidates}" in shown.stdout


def test_splice_eval_job_pools_shards_like_one_pass(local_ray, make_spec, direct, tmp_path):
    from circuitscan.pipelines.analyses.splice_eval import splice_eval_values
    from circuitscan.schemas.jobs import SpliceEvalParams
    from circuitscan.services.jobs.kinds.splice_eval import row_name
    from circuitscan.services.store.results import splice_eval_rows

    params = SpliceEvalParams(kind="splice_eval", layer_sets=[["L0.resid_post", "L1.z"]])
    spec = make_spec(tmp_path / "splice", prompts=KIND_PROMPTS, job=params)
    run_job(spec, keep_actors=True)

    model, saes, records, clean, _ = direct
    expected, metric, kl = splice_eval_values(
        model, [loaded.sae for loaded in saes.values()], clean.tokens, clean.lengths,
        spec.metric, clean.answer, clean.wrong,
        layer_sets=[["L0.resid_post"], ["L1.z"], ["L0.resid_post", "L1.z"]],
        reference_tokens=clean.tokens, reference_lengths=clean.lengths,
    )  # fmt: skip
    names = [row_name(r) for r in expected]
    check_splice_per_prompt(spec.store)
    check_breakdown(
        spec.store,
        "template",
        [r.template for r in records],
        {
            "metric": dict(zip(names, metric.numpy(), strict=True)),
            "kl": dict(zip(names, kl.numpy(), strict=True)),
        },
    )
    rows = splice_eval_rows(spec.store)
    assert [(r.sites, r.variant) for r in rows] == [(e.sites, e.variant) for e in expected]
    for row, want in zip(rows, expected, strict=True):
        assert row.n_prompts == want.n_prompts == 10
        for field in ("metric_mean", "metric_std", "kl_metric_pos", "kl_all_pos"):
            assert getattr(row, field) == pytest.approx(getattr(want, field), rel=1e-4, abs=1e-6)
        if want.metric_recovered is None:
            assert row.metric_recovered is None
        else:
            assert row.metric_recovered == pytest.approx(want.metric_recovered, rel=1e-3)


def _dfa_means(rows_by_prompt):
    """Per-feature means by head and by role from (roles, DFAResult) pairs."""
    import numpy as np

    sums: dict[int, dict] = {}
    for roles, result in rows_by_prompt:
        table = np.asarray(result.contributions)[:, : len(roles)]
        entry = sums.setdefault(result.feature, {"n": 0, "heads": 0.0, "roles": {}, "pre": 0.0})
        entry["n"] += 1
        entry["pre"] += result.pre_activation
        entry["heads"] = entry["heads"] + table.sum(axis=1)
        for role, value in zip(roles, table.sum(axis=0), strict=True):
            entry["roles"][role] = entry["roles"].get(role, 0.0) + value
    return sums


def test_dfa_job_matches_the_pipeline_per_prompt(local_ray, make_spec, direct, tmp_path):
    from circuitscan.pipelines.analyses.dfa import dfa_features
    from circuitscan.schemas.jobs import DFAParams
    from circuitscan.services.jobs.kinds.dfa import source_roles
    from circuitscan.services.store.results import dfa_features as read_dfa
    from circuitscan.services.store.results import dfa_tables

    # The pipeline's default pick (the most active features); tests/unit/test_dfa_selection.py
    # checks the job's own default on labelled prompts, by attribution.
    params = DFAParams(kind="dfa", position="END", top_features=3, features="by_activation")
    spec = make_spec(tmp_path / "dfa", prompts=KIND_PROMPTS, job=params)
    summary = run_job(spec, keep_actors=True)
    assert summary.shards_total == 4 and summary.prompts == 10

    model, saes, records, clean, _ = direct
    expected = []
    activations: dict[str, np.ndarray] = {}  # feature → per-prompt activation (NaN: not chosen)
    for index, record in enumerate(records):
        tokens = clean.tokens[index, : int(clean.lengths[index])]
        dest = record.positions["END"]
        assert dest == len(tokens) - 1  # IOI's END is the last token
        for result in dfa_features(model, [s.sae for s in saes.values()], tokens, 1, dest, top=3):
            expected.append((source_roles(dest, record.positions), result))
            per_prompt = activations.setdefault(str(result.feature), np.full(len(records), np.nan))
            per_prompt[index] = result.activation
    want = _dfa_means(expected)

    result = read_dfa(spec.store)
    assert result.site == "L1.z" and result.position == "END" and result.n_prompts == 10
    assert result.features_by == "by_activation"
    assert {f.feature for f in result.features} == set(want)
    totals = [f.mean_activation * f.n_prompts for f in result.features]
    assert totals == sorted(totals, reverse=True)
    for feature in result.features:
        entry = want[feature.feature]
        assert feature.n_prompts == entry["n"]
        assert feature.mean_pre_activation == pytest.approx(entry["pre"] / entry["n"], abs=1e-5)
        assert feature.head_means == pytest.approx((entry["heads"] / entry["n"]).tolist(), abs=1e-5)
        assert set(feature.source_means) <= {"IO", "S1", "S2", "END", "BOS", "other"}
        for role, value in entry["roles"].items():
            assert feature.source_means[role] == pytest.approx(value / entry["n"], abs=1e-5)
        # The decomposition is exact: heads (or roles) plus the constant give the pre-activation.
        assert sum(feature.head_means) + feature.bias == pytest.approx(
            feature.mean_pre_activation, abs=1e-4
        )
        assert sum(feature.source_means.values()) + feature.bias == pytest.approx(
            feature.mean_pre_activation, abs=1e-4
        )
    check_dfa_per_prompt(spec.store)
    check_breakdown(
        spec.store, "template", [r.template for r in records], {"activation": activations}
    )
    top = result.features[0].feature
    tables = dfa_tables(spec.store, top)
    assert [row["prompt"] for row in tables] == sorted(row["prompt"] for row in tables)
    assert len(tables) == result.features[0].n_prompts
    for row in tables:
        assert len(row["contributions"]) == model.cfg.n_heads
        assert all(len(per_head) == row["dest_pos"] + 1 for per_head in row["contributions"])


def test_custom_task_example_breaks_down_by_its_group_field(local_ray, make_spec, direct, tmp_path):
    """examples/custom_task_*.yaml on the tiny models: cache, then attribute with verification,
    then ``circuitscan results STORE --by group`` equals the pipeline's per-prompt values
    averaged by hand over each group of the JSONL's rows."""
    from circuitscan.pipelines.attribution import exact_patch, run_atp
    from circuitscan.pipelines.batching import tokenize_prompts
    from circuitscan.schemas.attribution import Node
    from circuitscan.services.jobs.kinds.attribute import attribution_method, node_selection
    from circuitscan.services.jobs.prompt_sources import load_prompts
    from circuitscan.services.jobs.spec_io import load_spec
    from circuitscan.services.store.results import read_result

    root = Path(__file__).resolve().parents[2]
    source = JsonlSource(kind="jsonl", path=str(root / "examples" / "custom_task.jsonl"))
    specs = {}
    for name in ("cache", "attribute"):
        example = load_spec(root / "examples" / f"custom_task_{name}.yaml")
        specs[name] = make_spec(tmp_path / name, prompts=source, job=example.job, shard_size=8)
        run_job(specs[name], keep_actors=True)
    assert FeatureStore.open(specs["cache"].store).layout.gradients
    spec = specs["attribute"]
    printed = _cli("results", spec.store, "--by", "group", "--json", "--top", "6")
    assert printed.returncode == 0, printed.stderr
    grouped = json.loads(printed.stdout)

    model, saes, _, _, _ = direct
    records = load_prompts(source, lambda: None)
    clean = tokenize_prompts(model, records)
    corrupt = tokenize_prompts(model, [r.model_copy(update={"text": r.corrupted}) for r in records])
    sae_map = {label: loaded.sae for label, loaded in saes.items()}
    named = [r.positions for r in records]
    atp = run_atp(
        model, sae_map, clean.tokens, corrupt.tokens, clean.lengths, spec.metric,
        clean.answer, clean.wrong, node_selection(spec.job), method=attribution_method(spec.job),
        named_positions=named, corrupt_lengths=corrupt.lengths,
    )  # fmt: skip
    column = {str(node): i for i, node in enumerate(atp.nodes())}
    result = read_result(spec.store)
    verified = [e.node for e in result.top if e.verification is not None]
    assert len(verified) == 8 and [row["item"] for row in grouped["rows"]] == [
        e.node for e in result.top[:6]
    ]
    exact = exact_patch(
        model, sae_map, clean.tokens, clean.lengths, spec.metric, clean.answer, clean.wrong,
        [Node.parse(n) for n in verified], mode="corrupt", corrupt_tokens=corrupt.tokens,
        corrupt_lengths=corrupt.lengths, named_positions=named,
    ).double().numpy()  # fmt: skip
    estimates = atp.per_prompt_signed().double().numpy()
    groups = [r.meta["group"] for r in records]
    assert {g["value"]: g["n_prompts"] for g in grouped["groups"]} == {"individual": 12, "team": 12}
    from circuitscan.schemas.breakdown import Breakdown

    breakdown = Breakdown.model_validate(grouped)
    for row in breakdown.rows:
        want = group_means(estimates[:, column[row.item]], groups)
        assert_cells(breakdown, row.item, "estimate", want)
        if row.item in verified:
            hand = group_means(exact[:, verified.index(row.item)], groups)
            assert_cells(breakdown, row.item, "exact", hand)
    shown = _cli("results", spec.store, "--by", "group", "--top", "3")
    assert shown.returncode == 0 and "attribute by group: 2 groups over 24 prompts" in shown.stdout
    assert "estimate[team]" in shown.stdout and "exact[individual]" in shown.stdout
    missing = _cli("results", spec.store, "--by", "colour")
    assert (
        missing.returncode == 2 and "no prompt of this store has a field 'colour'" in missing.stderr
    )
    assert "meta keys group" in missing.stderr

    # The same breakdown over real HTTP (the results route's query parameter).
    import httpx
    from api_server import thread_server

    from circuitscan.services.api import ApiSettings

    with thread_server(ApiSettings(store_root=str(tmp_path))) as base:
        route = f"{base}/api/stores/attribute/results/breakdown"
        served = httpx.get(route, params={"by": "group", "top": 6}, timeout=60)
        assert served.status_code == 200 and served.json() == grouped
        refused = httpx.get(route, params={"by": "colour"}, timeout=60)
        assert refused.status_code == 400 and "'colour'" in refused.json()["error"]


def test_a_worker_start_up_failure_is_reported_with_its_cause(local_ray, make_spec, tmp_path):
    from circuitscan.services.sae_loading import SAELoadError

    # Only a worker loads pretrained SAEs: its constructor's error reaches the driver as
    # itself (a user mistake, exit 2), not as Ray's ActorDiedError around it.
    spec = make_spec(tmp_path / "store", saes=[SAESpec(source="pretrained:no-such-release/x")])
    with pytest.raises(SAELoadError, match=r"^unknown sae_lens release 'no-such-release'$"):
        run_job(spec, keep_actors=True)
    assert not (tmp_path / "store").exists()


def test_dfa_job_bad_input_fails_before_storing(local_ray, make_spec, tmp_path, tiny_hf_sae_dirs):
    from circuitscan.schemas.jobs import AblationScanParams, DFAParams

    store = tmp_path / "dfa_bad"
    # The site checks run on the driver, against the SAEs the workers loaded.
    scan = make_spec(
        store, prompts=KIND_PROMPTS, job=AblationScanParams(kind="ablation_scan", site="L5.z")
    )
    with pytest.raises(JobError, match=r"ablation site 'L5\.z' is not one of the job's SAEs"):
        run_job(scan, keep_actors=True)
    assert not store.exists()
    named = make_spec(store, prompts=KIND_PROMPTS, job=DFAParams(kind="dfa", position="X"))
    with pytest.raises(JobError, match="'X' is not a named position of 10 of 10 prompts"):
        run_job(named, keep_actors=True)
    assert not store.exists()
    resid_only = make_spec(
        store,
        prompts=KIND_PROMPTS,
        saes=[SAESpec(source=str(tiny_hf_sae_dirs[0]))],
        job=DFAParams(kind="dfa"),
    )
    # Another SAE set: the pooled actors of the first must go, or these never schedule.
    with pytest.raises(JobError, match=r"need an attention-output \(hook_z\) SAE"):
        run_job(resid_only, keep_actors=True)
    assert not store.exists()
    wide = make_spec(store, prompts=KIND_PROMPTS, job=DFAParams(kind="dfa", features=[3, 48]))
    with pytest.raises(JobError, match=r"dfa features \[48\] out of range: the L1.z SAE has 48"):
        run_job(wide, keep_actors=True)
    assert not store.exists()
    far = make_spec(store, prompts=KIND_PROMPTS, job=DFAParams(kind="dfa", position=500))
    from circuitscan.services.jobs.ray_pool import ShardFailed

    # Only a worker knows a prompt's token count: whichever shard fails first ends the job.
    with pytest.raises(
        ShardFailed, match=r"dfa position 500 is outside prompt \d+ \(\d+ tokens with BOS\)"
    ):
        run_job(far, keep_actors=True)
    assert FeatureStore.open(str(store)).committed_shard_ids() == set()


# --- query and results commands --------------------------------------------------------


def test_cli_query_and_results_print_tables(local_ray, make_spec, tmp_path):
    from circuitscan.schemas.jobs import AttributeParams
    from circuitscan.services.store.results import top_nodes

    cache = make_spec(tmp_path / "cache", prompts=IOISource(kind="ioi", n=4, seed=6))
    run_job(cache, keep_actors=True)
    store = FeatureStore.open(cache.store)
    expected = features_at(store, "L0.resid_post", prompt=1, position=2, limit=3)

    at = _cli(
        "query", cache.store, "features-at", "--site", "L0.resid_post",
        "--prompt", "1", "--position", "2", "--limit", "3",
    )  # fmt: skip
    assert at.returncode == 0, at.stderr
    lines = at.stdout.splitlines()
    assert lines[1].split()[:4] == ["feature", "activation", "gradient", "attribution"]
    assert [int(line.split()[0]) for line in lines[3:]] == expected.feature_ids

    feature = expected.feature_ids[0]
    examples = _cli(
        "query", cache.store, "top-examples", "--site", "L0.resid_post",
        "--feature", str(feature), "--n", "2", "--no-decode",
    )  # fmt: skip
    assert examples.returncode == 0, examples.stderr
    want = top_examples(store, "L0.resid_post", feature, n=2)
    rows = examples.stdout.splitlines()[2:]
    assert [(int(r.split()[0]), int(r.split()[1])) for r in rows] == [
        (e.prompt, e.position) for e in want
    ]

    summary = _cli("query", cache.store, "summary")
    assert summary.returncode == 0 and "prompts           4" in summary.stdout

    # Two sites: the CLI names them instead of guessing.
    unsure = _cli("query", cache.store, "top-examples", "--feature", "0")
    assert unsure.returncode == 2
    assert "this store has sites L0.resid_post, L1.z: choose one with --site" in unsure.stderr

    outside = _cli("query", cache.store, "features-at", "--site", "L0.resid_post",
                   "--prompt", "9", "--position", "0")  # fmt: skip
    assert outside.returncode == 2 and "out of range" in outside.stderr
    assert "Traceback" not in outside.stderr

    attribute = make_spec(
        tmp_path / "attr",
        prompts=IOISource(kind="ioi", n=4, seed=6),
        job=AttributeParams(kind="attribute", method="atp", positions="last", verify_top_k=2),
    )
    run_job(attribute, keep_actors=True)
    printed = _cli("results", attribute.store, "--top", "3")
    assert printed.returncode == 0, printed.stderr
    rows = printed.stdout.splitlines()[3:]
    assert [r.split()[1] for r in rows] == [n.node for n in top_nodes(attribute.store, 3)]
    scores = [float(r.split()[2]) for r in rows]  # the column the ranking sorts by
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert rows[0].split()[-1] in (
        "confirmed",
        "underestimated",
        "overestimated",
        "sign_flipped",
        "no_effect",
    )
    no_result = _cli("results", cache.store)
    assert no_result.returncode == 2 and "holds no job result" in no_result.stderr


# --- specs and prompt sources (no Ray) -------------------------------------------------


def test_prompt_sources_and_spec_errors(tmp_path):
    import datasets

    from circuitscan.schemas.jobs import DatasetSource, TemplateSource, TextFileSource
    from circuitscan.services.jobs.prompt_sources import PromptSourceError, load_prompts
    from circuitscan.services.jobs.spec_io import SpecError, parse_spec

    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  \nsecond prompt\n", encoding="utf-8")
    assert [r.text for r in load_prompts(TextFileSource(kind="text", path=str(text)), None)] == [
        "first prompt",
        "second prompt",
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(PromptSourceError, match=r"bad\.jsonl:2"):
        load_prompts(JsonlSource(kind="jsonl", path=str(bad)), None)

    saved = tmp_path / "ds"
    datasets.Dataset.from_dict(
        {"sentence": ["a b", "c d", "e f"], "label": [" x", " y", " z"]}
    ).save_to_disk(saved)
    source = DatasetSource(
        kind="dataset", path=str(saved), text_column="sentence", answer_column="label", limit=2
    )
    assert [(r.text, r.answer) for r in load_prompts(source, None)] == [
        ("a b", " x"),
        ("c d", " y"),
    ]
    missing = DatasetSource(kind="dataset", path=str(saved), text_column="text")
    with pytest.raises(PromptSourceError, match="no column"):
        load_prompts(missing, None)

    template = TemplateSource(
        kind="template",
        templates=["When {A} and {B} met, {B} thanked"],
        fillers={"A": [" Mary", " John", " Anna"], "B": [" Tom", " Paul"]},
        answer="{A}",
        wrong="{B}",
        distinct=[["A", "B"]],
        n=5,
        seed=1,
    )
    filled = load_prompts(template, None)
    assert len(filled) == 5 and all(r.text.endswith("thanked") and r.answer for r in filled)
    assert filled == load_prompts(template, None)  # seeded: the same prompts every time

    with pytest.raises(SpecError) as error:
        parse_spec(
            "prompts: {kind: template, templates: ['{X}'], fillers: {}, n: 1}\njob: {kind: cache}\n"
        )
    message = str(error.value)
    assert "prompts.template" in message and "store" in message and "saes" not in message
    with pytest.raises(SpecError, match="needs at least one SAE"):
        parse_spec("prompts: {kind: ioi, n: 2}\njob: {kind: ablation_scan}\nstore: /tmp/x\n")
    with pytest.raises(SpecError, match=r"\['sae_feature'\] need at least one SAE"):
        parse_spec(
            "prompts: {kind: ioi, n: 2}\njob: {kind: attribute, nodes: [sae_feature, head_z]}\n"
            "store: /tmp/x\n"
        )


def test_named_positions_follow_left_truncation():
    from circuitscan.schemas.prompts import PromptRecord
    from circuitscan.services.jobs.shard_runner import named_positions

    records = [
        PromptRecord(text="a", positions={"IO": 2, "S2": 9, "END": 12}),
        PromptRecord(text="b", positions={"IO": 3, "END": 5}),
    ]
    # 4 tokens cut after BOS from the first prompt: IO (2) went with them.
    assert named_positions(records, [4, 0]) == [{"S2": 5, "END": 8}, {"IO": 3, "END": 5}]
    assert named_positions([PromptRecord(text="c")], [3]) is None
