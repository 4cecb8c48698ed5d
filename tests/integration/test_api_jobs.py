"""Jobs over HTTP against a private local Ray head: submit, list, follow, logs, cancel, restart.

The API submits exactly as ``circuitscan submit`` does (Ray's job server runs
``circuitscan run --spec-env CIRCUITSCAN_SPEC``); status and progress come
from Ray and from the store, so a fresh API process sees the same job.
"""

from __future__ import annotations

import time

import httpx
import pytest
from api_server import thread_server
from local_ray_head import RayHeadUnavailable, local_ray_head
from pydantic import SecretStr

from circuitscan.services.api import ApiSettings

pytestmark = pytest.mark.integration

TOKEN = "jobs-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def ray_head():
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        with local_ray_head(env, timeout=150) as head:
            yield head
    except RayHeadUnavailable as exc:
        pytest.skip(f"a local Ray head with a job server cannot start on this machine: {exc}")


def _settings(root, head) -> ApiSettings:
    return ApiSettings(store_root=root, tokens=(SecretStr(TOKEN),), ray_address=head.dashboard_url)


def test_submit_follow_and_restart(ray_head, tmp_path, tiny_hf_model_dir, tiny_hf_sae_dirs):
    root = tmp_path / "stores"
    spec = {
        "name": "api-ray-job",
        "model": {"source": str(tiny_hf_model_dir)},
        "saes": [{"source": str(path)} for path in tiny_hf_sae_dirs],
        "prompts": {"kind": "ioi", "n": 4, "seed": 0},
        "job": {"kind": "cache"},
        "store": "rayjob",
        "shard_size": 2,
        "execution": {"num_actors": 1},
    }
    with thread_server(_settings(root, ray_head)) as url:
        assert httpx.post(f"{url}/api/jobs", json={"spec": spec}).status_code == 401
        submitted = httpx.post(f"{url}/api/jobs", json={"spec": spec}, headers=AUTH, timeout=60)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job_id"]
        assert submitted.json()["store"] == "rayjob"

        listing = httpx.get(f"{url}/api/jobs", timeout=30).json()
        assert job_id in [job["job_id"] for job in listing["items"]]

        deadline = time.monotonic() + 240
        while True:
            status = httpx.get(f"{url}/api/jobs/{job_id}", timeout=30).json()
            if status["status"] in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        logs = httpx.get(f"{url}/api/jobs/{job_id}/logs", timeout=30).json()
        assert status["status"] == "SUCCEEDED", logs["logs"][-3000:]
        assert status["name"] == "api-ray-job" and status["kind"] == "cache"
        assert status["store"] == "rayjob"
        progress = status["progress"]
        assert progress["shards_planned"] == 2 and progress["shards_committed"] == 2
        assert progress["prompts_committed"] == 4 and progress["fraction"] == 1.0
        assert "done" in logs["logs"]

        cancel = httpx.post(f"{url}/api/jobs/{job_id}/cancel", headers=AUTH, timeout=30)
        assert cancel.status_code == 200 and cancel.json()["stopping"] is False
        assert httpx.get(f"{url}/api/jobs/raysubmit_nope", timeout=30).status_code == 404

        # A job cancelled right after submission stops; a later resume could finish it.
        longer = spec | {"prompts": {"kind": "ioi", "n": 64, "seed": 1}, "store": "cancelled"}
        second = httpx.post(f"{url}/api/jobs", json={"spec": longer}, headers=AUTH, timeout=60)
        second_id = second.json()["job_id"]
        stopped = httpx.post(f"{url}/api/jobs/{second_id}/cancel", headers=AUTH, timeout=30)
        assert stopped.status_code == 200 and stopped.json()["stopping"] is True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            late = httpx.get(f"{url}/api/jobs/{second_id}", timeout=30).json()
            if late["status"] in TERMINAL:
                break
            time.sleep(0.5)
        assert late["status"] == "STOPPED"
        assert late["progress"]["shards_planned"] == 32
        assert late["progress"]["shards_committed"] < 32

    # A new API process knows nothing but Ray and the store: it sees the same job.
    with thread_server(_settings(root, ray_head)) as url:
        again = httpx.get(f"{url}/api/jobs/{job_id}", timeout=30).json()
        assert again["status"] == "SUCCEEDED" and again["progress"] == progress
        store = httpx.get(f"{url}/api/stores/rayjob").json()
        assert store["n_prompts"] == 4 and len(store["shard_ids"]) == 2
        first = httpx.get(
            f"{url}/api/stores/rayjob/sites/{store['layout']['sites'][0]['label']}"
            "/prompts/0/features",
            params={"limit": 3},
        )
        assert first.status_code == 200 and first.json()["tokens"][0]
