"""One writer per store, and --overwrite replacing only a store: real jobs, real Ray, real folders.

The writer lease and replacing a store are checked on every backend by the
store contract (circuitscan.testing.writer_contract); here the job driver
and the CLI are exercised on local folders: a live lease refuses a second
``run`` / ``resume`` before anything starts, two drivers racing into one
store leave one job done and the other refused, a stale lease is taken
over, the lease is gone after a job however it ended, ``--overwrite``
never deletes a user's files, and an edited prompt file is refused.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from circuitscan.schemas.jobs import CacheParams, ExecutionSpec, IOISource, JobSpec, JsonlSource
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.input_digest import PromptsChangedError
from circuitscan.services.jobs.runner import JobError, run_job
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.lease import LeaseRecord, StoreLease
from circuitscan.services.store.store_keys import LEASE_KEY

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
            "prompts": IOISource(kind="ioi", n=6, seed=1),
            "job": CacheParams(kind="cache", gradients=False),
            "store": str(store),
            "shard_size": 2,
            "execution": ExecutionSpec(num_actors=1, torch_threads=1, batch_size=4),
        }
        return JobSpec(**{**base, **fields})

    return make


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _cli_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run in this process (what a user sees: exit status, stdout, stderr)."""
    from typer.testing import CliRunner

    from circuitscan.services.cli import app

    result = CliRunner().invoke(app, list(args))
    # Only typer.Exit (SystemExit) may end the command: any other exception is a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def _spec_file(spec: JobSpec, path: Path) -> Path:
    path.write_text(spec.model_dump_json(), encoding="utf-8")
    return path


def _digests(url: str) -> dict[int, str]:
    store = FeatureStore.open(url)
    return {sid: entry.digest() for sid, entry in store.committed_entries().items()}


def _dead_pid() -> int:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    return exited.pid


def test_a_live_lease_refuses_run_and_resume_before_anything_starts(local_ray, make_spec, tmp_path):
    spec = make_spec(tmp_path / "store")
    run_job(spec, keep_actors=True)
    assert not (tmp_path / "store" / LEASE_KEY).exists(), "a finished job left its lease"
    before = _digests(spec.store)
    spec_path = _spec_file(spec, tmp_path / "spec.json")

    with StoreLease(spec.store, job="holder"):
        # `run` as a real process (its exit status and stderr as a shell sees them),
        # `resume` through the same CLI in this process (the refusal comes before Ray).
        for refuse, args in (
            (_cli, ("run", str(spec_path))),
            (_cli_in_process, ("resume", spec.store)),
        ):
            refused = refuse(*args)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert "is being written by another job" in refused.stderr
            assert f"job 'holder', pid {os.getpid()} on {socket.gethostname()}" in refused.stderr
            assert "Traceback" not in refused.stderr
            assert refused.stderr.strip().count("\n") == 0, refused.stderr  # one line
        held = json.loads((tmp_path / "store" / LEASE_KEY).read_text())
        assert held["pid"] == os.getpid()  # the refused drivers left our lease alone
    assert _digests(spec.store) == before
    assert not (tmp_path / "store" / LEASE_KEY).exists()


def test_two_drivers_racing_into_one_store(local_ray, make_spec, tmp_path):
    reference = make_spec(tmp_path / "reference")
    run_job(reference, keep_actors=True)
    spec = make_spec(tmp_path / "store")
    spec_path = _spec_file(spec, tmp_path / "spec.json")
    drivers = [
        subprocess.Popen(
            [*CLI, "run", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(2)
    ]
    results = [(d.wait(timeout=300), *d.communicate()) for d in drivers]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    _, _, loser_err = next(r for r in results if r[0] == 2)
    assert "is being written by another job" in loser_err and "Traceback" not in loser_err
    assert _digests(spec.store) == _digests(reference.store)
    assert not (tmp_path / "store" / LEASE_KEY).exists()


def test_a_stale_lease_of_a_dead_driver_is_taken_over(local_ray, make_spec, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    now = time.time()
    dead = LeaseRecord(
        owner="killed",
        host=socket.gethostname(),
        pid=_dead_pid(),
        job="tiny",
        started=now - 30,
        heartbeat=now - 2,  # fresh, but its process is gone
        ttl_s=120,
    )
    (store / LEASE_KEY).write_text(dead.model_dump_json())
    notes: list[str] = []
    summary = run_job(make_spec(store), keep_actors=True, echo=notes.append)
    assert summary.shards_run == summary.shards_total == 3
    taken = [note for note in notes if "took over the stale writer lease" in note]
    assert taken and f"process {dead.pid} is no longer running" in taken[0]
    assert not (store / LEASE_KEY).exists()


def test_the_lease_is_released_after_a_failed_job(local_ray, make_spec, tmp_path):
    spec = make_spec(tmp_path / "store", max_prompt_tokens=2, overlong="reject")
    with pytest.raises(JobError, match="exceed the token cap"):
        run_job(spec, keep_actors=True)
    # The lease was the only thing there: no lease, and no folder left behind.
    assert not (tmp_path / "store").exists()
    StoreLease(spec.store).take().release()  # free for the next writer


def test_overwrite_refuses_a_folder_of_user_files_and_keeps_them(make_spec, tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    (target / "runs").mkdir()
    (target / "runs" / "a.csv").write_text("1,2")
    spec_path = _spec_file(make_spec(target), tmp_path / "spec.json")

    refused = _cli("run", str(spec_path), "--overwrite")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{target} is not empty and holds no feature store" in refused.stderr
    assert "notes.txt" in refused.stderr and "runs/" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (target / "notes.txt").read_text() == "my notes"
    assert (target / "runs" / "a.csv").read_text() == "1,2"
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "runs"]  # no lease left


def test_overwrite_replaces_an_old_store_and_nothing_else(local_ray, make_spec, tmp_path):
    old = make_spec(tmp_path / "store", prompts=IOISource(kind="ioi", n=3, seed=1))
    run_job(old, keep_actors=True)
    (tmp_path / "store" / "README.txt").write_text("what this store is")
    new = make_spec(tmp_path / "store", prompts=IOISource(kind="ioi", n=4, seed=2))
    with pytest.raises(JobError, match="--overwrite"):
        run_job(new, keep_actors=True)
    summary = run_job(new, keep_actors=True, overwrite=True)
    assert (summary.shards_run, summary.prompts) == (2, 4)
    store = FeatureStore.open(new.store)
    assert store.layout.job_hash == new.content_hash() and store.committed_shard_ids() == {0, 1}
    assert (tmp_path / "store" / "README.txt").read_text() == "what this store is"
    assert not (tmp_path / "store" / LEASE_KEY).exists()


def test_an_edited_prompt_file_is_refused_by_run_and_resume(local_ray, make_spec, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"text": f"Prompt number {i}."}) + "\n" for i in range(4))
    )
    spec = make_spec(
        tmp_path / "store",
        prompts=JsonlSource(kind="jsonl", path=str(prompts)),
        metric=MetricSpec(kind="next_token_loss"),
    )
    run_job(spec, keep_actors=True)
    before = _digests(spec.store)
    prompts.write_text(prompts.read_text().replace("number 2", "number two"))

    with pytest.raises(PromptsChangedError, match=rf"the prompts of {prompts} changed"):
        run_job(spec, keep_actors=True)
    resumed = _cli_in_process("resume", spec.store)
    assert resumed.returncode == 2, resumed.stdout + resumed.stderr
    assert f"the prompts of {prompts} changed" in resumed.stderr
    assert "sha256" in resumed.stderr and "Traceback" not in resumed.stderr
    assert _digests(spec.store) == before  # nothing recomputed from the edited file
    assert not (tmp_path / "store" / LEASE_KEY).exists()
