"""A job on a real two-node Ray cluster started on loopback by this test.

Both nodes are ``ray start --block`` processes in process groups this test
owns, with their own temp dir (so no other Ray user on the machine finds or
joins them); teardown kills exactly those groups. The job's driver is the
real ``circuitscan run --address`` process, as on a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from circuitscan.schemas.jobs import CacheParams, ExecutionSpec, IOISource, JobSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.runner import JobSummary
from circuitscan.services.store import FeatureStore

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))
CIRCUITSCAN = str(Path(sys.executable).with_name("circuitscan"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop one `ray start --block` and everything it started (its process group)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="csjobs_", dir="/tmp")  # short: socket paths
    port = _free_port()
    # A cluster private to this test: no token auth to share with the test process.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1"]
    logs = Path(temp_dir)
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [RAY, "start", *common, *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )

    try:
        start(
            "head",
            [
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
            ],
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if processes[0].poll() is not None or time.monotonic() > deadline:
                    log = (logs / "head.log").read_text(errors="replace")[-2000:]
                    pytest.skip(f"`ray start --head` could not start here:\n{log}")
                time.sleep(0.5)
        start("worker", [f"--address=127.0.0.1:{port}", "--disable-usage-stats"])
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while len(_alive_nodes(address, env)) < 2:
            if processes[1].poll() is not None or time.monotonic() > deadline:
                log = (logs / "worker.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"the second node did not join:\n{log}")
            time.sleep(1)
        yield address, env, _alive_nodes(address, env)
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive_nodes(address: str, env: dict[str, str]) -> set[str]:
    """Node ids of the cluster, asked from a separate driver process."""
    probe = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    return set(json.loads(done.stdout.splitlines()[-1])) if done.returncode == 0 else set()


def test_job_shards_land_on_both_nodes(
    two_node_cluster, tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path
):
    spec = JobSpec(
        name="two-nodes",
        model=ModelSpec(source=str(tiny_hf_model_dir)),
        saes=[SAESpec(source=str(path)) for path in tiny_hf_sae_dirs],
        prompts=IOISource(kind="ioi", n=8, seed=7),
        job=CacheParams(kind="cache"),
        store=str(tmp_path / "store"),
        shard_size=1,
        execution=ExecutionSpec(num_actors=2, torch_threads=1, batch_size=4),
    )
    address, env, nodes = two_node_cluster
    spec_path, summary_path = tmp_path / "spec.json", tmp_path / "summary.json"
    spec_path.write_text(spec.model_dump_json(), encoding="utf-8")
    done = subprocess.run(
        [
            CIRCUITSCAN,
            "run",
            str(spec_path),
            "--address",
            address,
            "--summary-json",
            str(summary_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = JobSummary.model_validate_json(summary_path.read_text())

    assert set(summary.nodes) == nodes, summary.nodes
    assert sum(summary.nodes.values()) == summary.shards_run == 8
    store = FeatureStore.open(spec.store)
    assert store.committed_shard_ids() == set(range(8)) and store.n_prompts() == 8
