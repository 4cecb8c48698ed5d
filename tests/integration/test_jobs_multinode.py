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

from circuitscan.schemas.jobs import (
    AttributeParams,
    CacheParams,
    ExecutionSpec,
    IOISource,
    JobSpec,
    StoreSource,
)
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.runner import JobSummary
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import read_result

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
    port, dashboard_port = _free_port(), _free_port()
    # A cluster private to this test: no token auth to share with the test process;
    # `circuitscan` on PATH for jobs submitted through Ray's job server.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
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
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
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
        yield address, env, _alive_nodes(address, env), f"http://127.0.0.1:{dashboard_port}"
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


def _spec(model_dir: Path, sae_dirs: list[Path], store: Path, n: int) -> JobSpec:
    return JobSpec(
        name="two-nodes",
        model=ModelSpec(source=str(model_dir)),
        saes=[SAESpec(source=str(path)) for path in sae_dirs],
        prompts=IOISource(kind="ioi", n=n, seed=7),
        job=CacheParams(kind="cache", paired=True),
        store=str(store),
        shard_size=1,
        execution=ExecutionSpec(num_actors=2, torch_threads=1, batch_size=4),
    )


def test_job_shards_land_on_both_nodes(
    two_node_cluster, tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path
):
    spec = _spec(tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path / "store", n=8)
    address, env, nodes, _ = two_node_cluster
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

    # AtP from the paired cache: Ray tasks on both nodes, no model loaded anywhere.
    from_store = spec.model_copy(
        update={
            "prompts": StoreSource(kind="store", url=spec.store),
            "job": AttributeParams(
                kind="attribute", method="atp", nodes=["sae_feature", "sae_error"]
            ),
            "store": str(tmp_path / "from-store"),
        }
    )
    spec_path.write_text(from_store.model_dump_json(), encoding="utf-8")
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
    assert set(summary.nodes) == nodes and summary.shards_run == 8 and summary.actors == 0
    result = read_result(from_store.store)
    assert result.n_prompts == 8 and result.top and result.n_verified == 0


def test_submit_status_logs_stop_through_ray_job_submission(
    two_node_cluster, tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, env, _, dashboard = two_node_cluster
    spec = _spec(tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path / "store", n=4)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json(), encoding="utf-8")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CIRCUITSCAN, *args, "--address", dashboard],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    deadline = time.monotonic() + 120
    while (submitted := cli("submit", str(spec_path))).returncode != 0:
        assert time.monotonic() < deadline, submitted.stderr  # the job server starts last
        time.sleep(2)
    job_id = submitted.stdout.strip().splitlines()[-1]

    client = JobSubmissionClient(dashboard)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + 300
    while (status := client.get_job_status(job_id)) not in terminal:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(2)
    logs = cli("logs", job_id)
    assert status == JobStatus.SUCCEEDED, logs.stdout[-3000:]

    shown = cli("status", job_id)
    assert shown.returncode == 0 and shown.stdout.split("\t")[:2] == [job_id, "SUCCEEDED"]
    assert logs.returncode == 0 and "shards 4: ran 4, reused 0" in logs.stdout
    stopped = cli("stop", job_id)
    assert stopped.returncode == 0 and "already finished" in stopped.stdout
    assert FeatureStore.open(spec.store).committed_shard_ids() == {0, 1, 2, 3}
