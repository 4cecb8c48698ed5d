"""The HTTP API over stores in object storage: a real S3-compatible server (moto), real HTTP.

A store written locally is copied to ``s3://circuitscan/api/NAME`` object by
object; the API, started with that prefix as its store root, must list it,
answer the same point queries and results as the local store, and see a
store uploaded while it runs.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from api_server import SITES, api_server, build_store
from s3_server import moto_s3, upload_folder

from circuitscan.schemas.job_results import DFAFeatureSummary, DFAJobResult
from circuitscan.services.api.settings import ApiSettings
from circuitscan.services.store import FeatureStore, features_at, top_examples
from circuitscan.services.store.results import write_job_result

pytestmark = pytest.mark.integration

SITE = SITES[1].label
ROOT = "s3://circuitscan/api"


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, tiny_hf_model_dir) -> Path:
    path = tmp_path_factory.mktemp("s3_api") / "ioi"
    store = build_store(path, tiny_hf_model_dir)
    write_job_result(
        store,
        DFAJobResult(
            job_hash="s3-test",
            site="L1.z",
            position="last",
            n_prompts=3,
            features=[
                DFAFeatureSummary(
                    feature=5,
                    n_prompts=3,
                    mean_activation=1.0,
                    mean_pre_activation=1.0,
                    bias=0.5,
                    head_means=[0.25, 0.25],
                    source_means={"first": 0.5},
                )
            ],
        ),
    )
    return path


@pytest.fixture(scope="module")
def client(local_store):
    with moto_s3():
        upload_folder(local_store, "api/ioi")
        with api_server(ROOT) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield http


def test_s3_root_serves_the_same_answers_as_the_local_store(client, local_store):
    local = FeatureStore.open(str(local_store))
    listing = client.get("/api/stores").json()
    assert [item["name"] for item in listing["items"]] == ["ioi"]
    assert listing["items"][0]["n_tokens"] == local.n_tokens()

    info = client.get("/api/stores/ioi").json()
    assert info["shard_ids"] == sorted(local.committed_shard_ids())

    feature = int(local.feature_index(SITE).count.argmax())
    examples = client.get(
        f"/api/stores/ioi/sites/{SITE}/features/{feature}/examples", params={"limit": 3}
    ).json()
    want = top_examples(local, SITE, feature, n=3)
    assert [e["activation"] for e in examples["examples"]] == [e.activation for e in want]
    point = client.get(f"/api/stores/ioi/sites/{SITE}/prompts/1/positions/2/features").json()
    direct = features_at(local, SITE, 1, 2, limit=50)
    assert point["features"] == direct.model_dump(mode="json")
    assert point["features"]["feature_ids"]

    dfa = client.get("/api/stores/ioi/results/dfa").json()
    assert dfa["features"][0]["feature"] == 5 and dfa["site"] == "L1.z"


def test_s3_root_sees_new_stores_and_answers_404(client, local_store):
    assert client.get("/api/stores/missing").status_code == 404
    assert client.get("/api/stores/missing/results/dfa").status_code == 404
    upload_folder(local_store, "api/ioi-copy")
    names = [item["name"] for item in client.get("/api/stores").json()["items"]]
    assert names == ["ioi", "ioi-copy"]
    assert client.get("/api/stores/ioi-copy").json()["shard_ids"] == [0, 1, 2]


def test_store_root_settings_reject_other_schemes():
    with pytest.raises(ValueError, match="unsupported store root 'gs://b/p'"):
        ApiSettings(store_root="gs://b/p")
    with pytest.raises(ValueError, match="needs a bucket"):
        ApiSettings(store_root="s3://")
