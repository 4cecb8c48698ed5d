"""The warm local pool for real: `circuitscan up` on the tiny models, two jobs, `down`.

Every step is the real command in its own process, on a real Ray head: `up`
starts the head and one actor holding the tiny Llama and its SAEs; two
`circuitscan run` jobs then run on that very actor (same pid, the model
loaded once in its process, every shard of both jobs counted by it) and
store the same bytes as the same job run without the pool; `down` ends every
process `up` started and removes its record and temp folder. The pool file
lives in this test's own state folder, so no other Ray or pool is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "circuitscan.services.cli"]
# The spec (name, store) is all that differs between the stores compared.
SPEC_FILES = {"zarr.json", "job.json", "lease.json"}


def _env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("CIRCUITSCAN_NO_POOL", None)  # tests/conftest.py turns pools off for other tests
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
        CIRCUITSCAN_STATE_DIR=str(state),
    )
    return env


def _write_spec(folder: Path, name: str, model: Path, saes: list[Path]) -> Path:
    spec = {
        "name": f"pool-{name}",
        "model": {"source": str(model)},
        "saes": [{"source": str(path)} for path in saes],
        "prompts": {"kind": "ioi", "n": 8, "seed": 1},
        "job": {
            "kind": "attribute",
            "method": "atp",
            "nodes": ["z", "feature"],
            "positions": ["END"],
            "verify_top_k": 3,  # verification runs on the pool's actors too
        },
        "store": str(folder / f"store_{name}"),
        "shard_size": 4,
        "execution": {"num_actors": 1, "torch_threads": 1, "batch_size": 4},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def _store_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in SPEC_FILES
    }


def _family(record: dict[str, Any]) -> dict[int, float]:
    """The pool's recorded processes and every current descendant of them."""
    found: dict[int, float] = {}
    for process in [record["root"], *record["processes"]]:
        try:
            root = psutil.Process(process["pid"])
            if abs(root.create_time() - process["started"]) >= 0.05:
                continue
            for member in [root, *root.children(recursive=True)]:
                found[member.pid] = member.create_time()
        except psutil.Error:
            continue
    return found


def _running(known: dict[int, float]) -> list[str]:
    left = []
    for pid, started in known.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 0.05 and (
                process.status() != psutil.STATUS_ZOMBIE
            ):
                left.append(f"{pid} {process.name()}")
    return left


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)


def test_two_jobs_share_the_warm_actors_and_down_stops_what_up_started(
    tmp_path, tiny_hf_model_dir, tiny_hf_sae_dirs
):
    state = tmp_path / "state"
    env = _env(state)
    specs = {
        name: _write_spec(tmp_path, name, tiny_hf_model_dir, tiny_hf_sae_dirs)
        for name in ("first", "second", "reference")
    }
    # The same job without the pool, started beside `up` (both start a Ray of their own).
    reference = subprocess.Popen(
        [*CLI, "run", str(specs["reference"]), "--no-pool"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    record: dict[str, Any] | None = None
    known: dict[int, float] = {}
    try:
        up = _cli(env, "up", str(specs["first"]), "--actors", "1", "--num-cpus", "1",
                  "--object-store-mb", "100")  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        assert "warm pool up at 127.0.0.1:" in up.stdout
        record = json.loads((state / "pool.json").read_text(encoding="utf-8"))
        assert record["actors"] == ["pool-0"] and record["driver"]

        again = _cli(env, "up")  # refused before anything starts
        assert again.returncode == 2 and "already running" in again.stderr, again.stderr

        summaries = {}
        for name in ("first", "second"):
            out_file = tmp_path / f"{name}.summary.json"
            run = _cli(env, "run", str(specs[name]), "--summary-json", str(out_file))
            assert run.returncode == 0, run.stdout + run.stderr
            assert "1 actor(s) already holding the model and SAEs" in run.stdout, run.stdout
            summaries[name] = json.loads(out_file.read_text(encoding="utf-8"))

        # A mistake found by the pool's driver comes back as itself: one line, exit 2.
        clash = json.loads(specs["first"].read_text(encoding="utf-8"))
        clash["job"]["verify_top_k"] = 2  # another job into the first job's store
        (tmp_path / "clash.json").write_text(json.dumps(clash), encoding="utf-8")
        refused = _cli(env, "run", str(tmp_path / "clash.json"))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "already holds a different job" in refused.stderr
        assert "Traceback" not in refused.stderr

        status = _cli(env, "up", "--status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["running"] is True
        (actor,) = report["actors"]
        # One process served both jobs from one model load, every shard of both.
        assert actor["model_loads"] == 1
        assert actor["jobs"] == 2
        assert actor["shards"] == sum(s["shards_run"] for s in summaries.values()) == 4
        assert summaries["first"]["pids"] == summaries["second"]["pids"] == [actor["pid"]]
        known = _family(record)
        assert actor["pid"] in known  # the actor is one of the processes `up` started

        ref_out, _ = reference.communicate(timeout=600)
        assert reference.returncode == 0, ref_out
        assert "warm pool" not in ref_out
        expected = _store_files(tmp_path / "store_reference")
        assert any(name.startswith("results/") for name in expected)
        for name in ("first", "second"):
            assert _store_files(tmp_path / f"store_{name}") == expected, name

        known |= _family(record)
        down = _cli(env, "down")
        assert down.returncode == 0, down.stderr
        assert f"warm pool at {record['address']} stopped" in down.stdout
        deadline = time.monotonic() + 30
        while _running(known) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running(known) == [], "processes `up` started still running after `down`"
        assert not (state / "pool.json").exists()
        assert not Path(record["temp_dir"]).exists()

        nothing = _cli(env, "down")
        assert nothing.returncode == 0 and "no warm pool to stop" in nothing.stdout
    finally:
        if (state / "pool.json").exists():
            _cli(env, "down")
        for pid in _running(known):  # only what this test's pool started
            with contextlib.suppress(psutil.Error):
                psutil.Process(int(pid.split()[0])).kill()
        if reference.poll() is None:
            reference.kill()
            reference.wait(timeout=30)
