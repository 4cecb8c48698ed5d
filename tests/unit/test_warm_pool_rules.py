"""The warm pool's bookkeeping without Ray: when a job may use the pool's actors, and when not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from circuitscan.schemas.jobs import CacheParams, ExecutionSpec, IOISource, JobSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs import pool_lifecycle, warm_pool


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv(warm_pool.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.delenv(warm_pool.NO_POOL_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path / "state"


@pytest.fixture
def files(tmp_path):
    """Stand-ins for a model folder and an SAE folder (only their files' stats matter here)."""
    model = tmp_path / "model"
    sae = tmp_path / "sae"
    for folder in (model, sae):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"0123")
    return model, sae


def _spec(model, sae, **execution) -> JobSpec:
    return JobSpec(
        model=ModelSpec(source=str(model)),
        saes=[SAESpec(source=str(sae))],
        prompts=IOISource(kind="ioi", n=1, seed=0),
        job=CacheParams(kind="cache"),
        store="memory://pool-test",
        execution=ExecutionSpec(**execution),
    )


def _record(spec: JobSpec, root: warm_pool.ProcessId, address: str) -> warm_pool.PoolRecord:
    return warm_pool.PoolRecord(
        address=address, temp_dir="/nonexistent", root=root, processes=[], actors=["pool-0"],
        load=warm_pool.load_of(spec, False), token_auth=False, started_at="now", log="",
    )  # fmt: skip


def test_a_job_runs_on_the_pool_only_with_the_same_model_saes_threads_and_files(files):
    model, sae = files
    spec = _spec(model, sae)
    record = _record(spec, warm_pool.ProcessId(pid=1, started=0.0), "127.0.0.1:1")
    assert warm_pool.mismatch(record, spec, False) is None
    other = spec.model_copy(update={"saes": []})
    assert "SAEs" in (warm_pool.mismatch(record, other, False) or "")
    assert "model" in (warm_pool.mismatch(record, _spec(sae, sae), False) or "")
    threads = "torch thread" in (
        warm_pool.mismatch(record, _spec(model, sae, torch_threads=2), False) or ""
    )
    assert threads
    assert "GPUs" in (warm_pool.mismatch(record, spec, True) or "")
    (sae / "weights.safetensors").write_bytes(b"01234")  # other weights than the actors loaded
    assert "changed on disk" in (warm_pool.mismatch(record, spec, False) or "")


def test_no_pool_file_a_dead_head_or_opting_out_means_no_pool(state, files, monkeypatch):
    model, sae = files
    spec = _spec(model, sae)
    notes: list[str] = []
    assert warm_pool.find_pool(None, say=notes.append) is None and notes == []
    # A record whose head process is gone (a pid that ran and exited).
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = warm_pool.ProcessId(pid=int(done.stdout), started=1.0)
    warm_pool.write_record(_record(spec, gone, "127.0.0.1:9"))
    assert warm_pool.find_pool(None, say=notes.append) is None
    assert len(notes) == 1 and "not running" in notes[0]
    assert not warm_pool.pool_holds(spec, None, None)
    # A live "head" (this process) whose port answers: found, unless told not to.
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        me = warm_pool.process_id(os.getpid())
        assert me is not None
        warm_pool.write_record(_record(spec, me, f"127.0.0.1:{listener.getsockname()[1]}"))
        assert warm_pool.find_pool(None, say=notes.append) is not None
        assert warm_pool.pool_holds(spec, None, None)
        assert warm_pool.find_pool(None, use_pool=False, say=notes.append) is None
        assert warm_pool.find_pool("127.0.0.1:6379", say=notes.append) is None  # a named cluster
        monkeypatch.setenv(warm_pool.NO_POOL_ENV, "1")
        assert warm_pool.find_pool(None, say=notes.append) is None


def test_a_damaged_pool_file_is_named_and_down_without_a_pool_stops_nothing(state):
    assert pool_lifecycle.stop_pool() is None
    assert pool_lifecycle.pool_status()["running"] is False
    state.mkdir(parents=True)
    (state / warm_pool.POOL_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(warm_pool.PoolUnavailable, match=r"pool\.json"):
        warm_pool.read_record()


def test_up_without_a_spec_loads_the_default_model_and_every_shipped_sae():
    from circuitscan.services.pool_commands import _pool_spec
    from circuitscan.services.sae_loading import default_sae_names

    spec = _pool_spec(None, None, None, None)
    assert spec.model == ModelSpec()
    assert [sae.source for sae in spec.saes] == [f"default/{n}" for n in default_sae_names()]
    assert spec.execution.torch_threads == 1
