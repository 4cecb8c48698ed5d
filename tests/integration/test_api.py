"""The HTTP API over real HTTP: `circuitscan serve` (uvicorn) on 127.0.0.1, a real store, httpx.

Job submission against a real Ray job server is in test_api_jobs.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from api_server import PROMPTS, SITES, api_server, build_store, thread_server
from pydantic import SecretStr

from circuitscan.schemas.analyses import SpliceEvalRow
from circuitscan.schemas.job_results import (
    AblationJobResult,
    AttributionJobResult,
    DFAFeatureSummary,
    DFAJobResult,
    FeatureDelta,
    NodeEffect,
    NodeVerification,
    SpliceEvalJobResult,
)
from circuitscan.services.api import ApiSettings
from circuitscan.services.model_loading import load_tokenizer
from circuitscan.services.store import FeatureStore, feature_summary, features_at, top_examples
from circuitscan.services.store.results import write_job_result
from circuitscan.testing.corruption import damage

pytestmark = pytest.mark.integration

TOKEN = "test-token-1"
STORE = "demo"
SITE = SITES[1].label
MAX_PAGE = 100  # api_server sets CIRCUITSCAN_API_MAX_PAGE_SIZE=100
MAX_BODY = 65536  # and CIRCUITSCAN_API_MAX_BODY_BYTES=65536


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, tiny_hf_model_dir) -> Path:
    """A store root with one real store, one symlink escaping the root, one leaky store.

    Plus ``scan``: the same cache holding an ablation scan's result and nothing else,
    and the damaged copies of :data:`DAMAGED`.
    """
    root = tmp_path_factory.mktemp("api_root") / "stores"
    root.mkdir()
    build_store(root / STORE, tiny_hf_model_dir)
    shutil.copytree(root / STORE, root / "scan")
    write_job_result(FeatureStore.open(str(root / "scan")), ABLATION)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / STORE, outside / "secret")
    (outside / "passwd").write_text("root:x:0:0")
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    _write_results(FeatureStore.open(str(root / STORE)))
    shutil.copytree(root / STORE, root / "leaky")
    (root / "leaky" / "shards" / "evil").symlink_to(outside / "passwd")
    for name, (key, how) in DAMAGED.items():  # every route over these: a 409, never a 500
        shutil.copytree(root / STORE, root / name)
        if key == "index":
            key = next(  # a row chunk of the merged index (index_chunks.py)
                str(p.relative_to(root / name))
                for p in sorted((root / name).glob("index/*"))
                if p.name != "current.json"
            )
        damage(root / name, key, how)
    return root


# Damaged copies of the store: each route answers a 409 naming the object (not a 500).
DAMAGED = {
    "damaged-manifest": ("manifest/000001.json", "truncate"),
    "damaged-index": ("index", "flip"),  # a row chunk of the merged index
    "damaged-result": ("results/attribute.json", "flip"),
    "damaged-layout": ("zarr.json", "truncate"),
}


NODES = [
    NodeEffect(
        node=f"feature:{SITE}:{i}@last",
        mean=(-1) ** i * (1.0 - i / 10),
        mean_abs=1.0 - i / 10,
        n_prompts=5,
        verification=NodeVerification(
            exact_mean=(-1) ** i * 0.9, exact_mean_abs=0.9, n_prompts=5, status="confirmed"
        )
        if i < 2
        else None,
    )
    for i in range(7)
]
SPLICE_ROWS = [
    SpliceEvalRow(
        sites=[], variant="clean", n_prompts=5, metric_mean=3.1, metric_std=0.4, kl_metric_pos=0.0
    ),
    SpliceEvalRow(
        sites=[SITE],
        variant="spliced",
        n_prompts=5,
        metric_mean=2.5,
        metric_std=0.6,
        kl_metric_pos=0.12,
        metric_recovered=0.8,
    ),
]

DFA_FEATURES = [
    DFAFeatureSummary(
        feature=i,
        n_prompts=5 - i,
        mean_activation=2.0 - i / 4,
        mean_pre_activation=2.0 - i / 4,
        bias=0.25,
        head_means=[1.0 - i / 4, 0.75],
        source_means={"S1": 1.25 - i / 4, "END": 0.5},
    )
    for i in range(4)
]

ABLATION = AblationJobResult(
    job_hash="api-scan",
    site=SITE,
    mode="zero",
    n_prompts=5,
    n_ablations=30,
    baseline_mean=3.1,
    features=[
        FeatureDelta(
            site=SITE,
            feature=i,
            mean_delta=-(6 - i) / 4,
            mean_abs_delta=(6 - i) / 4,
            n_prompts=5,
            n_active=5 - i % 3,
        )
        for i in range(6)
    ],
)


def _write_results(store: FeatureStore) -> None:
    """Job results as a job's driver stores them when it finishes."""
    write_job_result(
        store,
        AttributionJobResult(
            job_hash="api-test", method="atpstar", n_prompts=5, n_nodes=40, n_verified=2, top=NODES
        ),
    )
    write_job_result(
        store,
        SpliceEvalJobResult(
            job_hash="api-test", n_prompts=5, reference_prompts=5, rows=SPLICE_ROWS
        ),
    )
    write_job_result(
        store,
        DFAJobResult(
            job_hash="api-test", site="L1.z", position="END", n_prompts=5, features=DFA_FEATURES
        ),
    )


@pytest.fixture(scope="module")
def server(store_root) -> str:
    with api_server(store_root, tokens=f"{TOKEN},other-token") as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    # Generous: a first request may load a tokenizer, and CI machines can be slow.
    with httpx.Client(base_url=server, timeout=120) as http:
        yield http


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["error"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_their_scripts_from_this_server(client, page):
    """Air-gapped clusters: the docs pages must not need a CDN."""
    html = client.get(page)
    assert html.status_code == 200 and "/openapi.json" in html.text
    scripts = re.findall(r'<script src="([^"]+)"', html.text)
    assert scripts and all(src.startswith("/") for src in scripts), scripts
    for src in scripts:
        asset = client.get(src)
        assert asset.status_code == 200 and len(asset.content) > 100_000, src


def test_openapi_documents_every_route(client):
    schema = client.get("/openapi.json").json()
    operations = {
        (method.upper(), path): op
        for path, item in schema["paths"].items()
        for method, op in item.items()
    }
    expected = {
        ("GET", "/api/stores"),
        ("GET", "/api/stores/{store}"),
        ("GET", "/api/stores/{store}/prompts"),
        ("GET", "/api/stores/{store}/sites/{site}/prompts/{prompt}/positions/{position}/features"),
        ("GET", "/api/stores/{store}/sites/{site}/features/{feature}/examples"),
        ("GET", "/api/stores/{store}/sites/{site}/summaries"),
        ("GET", "/api/stores/{store}/results/attribution"),
        ("GET", "/api/stores/{store}/results/splice-eval"),
        ("GET", "/api/stores/{store}/results/dfa"),
        ("POST", "/api/jobs"),
        ("GET", "/api/jobs"),
        ("GET", "/api/jobs/{job_id}"),
        ("POST", "/api/jobs/{job_id}/cancel"),
        ("GET", "/api/jobs/{job_id}/logs"),
    }
    assert expected <= set(operations)
    for key, op in operations.items():
        ok = [code for code in op["responses"] if code.startswith("2")]
        assert ok, key
        content = op["responses"][ok[0]]["content"]["application/json"]["schema"]
        assert "$ref" in content or content, key
        assert op["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorBody"
        )
    assert operations[("POST", "/api/jobs")]["requestBody"]["content"]["application/json"]
    assert operations[("POST", "/api/jobs")]["security"]


def test_top_attributions_route_answers_what_the_index_answers(client, store_root):
    from circuitscan.services.store.rankings import top_attributions

    store = FeatureStore.open(str(store_root / STORE))
    base = f"/api/stores/{STORE}/sites/{SITE}/top-attributions"
    ranking = client.get(base, params={"limit": 5})
    assert ranking.status_code == 200, ranking.text
    assert ranking.json() == top_attributions(store, SITE, n=5).model_dump(mode="json")
    feature = ranking.json()["rows"][0]["feature"]
    for per in ("prompt", "position"):
        rows = client.get(base, params={"feature": feature, "per": per, "limit": 3})
        expected = top_attributions(store, SITE, per=per, feature=feature, n=3)
        assert rows.json() == expected.model_dump(mode="json")
    by_abs = client.get(base, params={"rank_by": "abs", "limit": 3}).json()
    expected_abs = top_attributions(store, SITE, n=3, rank_by="abs").model_dump(mode="json")
    assert by_abs["rows"] == expected_abs["rows"]
    assert "give feature" in _error(client.get(base, params={"per": "position"}), 400)
    assert "out of range" in _error(client.get(base, params={"feature": 10_000}), 404)
    assert "unknown site" in _error(
        client.get(f"/api/stores/{STORE}/sites/L9.z/top-attributions"), 404
    )


def test_store_routes_match_direct_store_queries(client, store_root, tiny_hf_model_dir):
    store = FeatureStore.open(str(store_root / STORE))
    tokenizer = load_tokenizer(
        __import__("circuitscan.schemas.models", fromlist=["ModelSpec"]).ModelSpec(
            source=str(tiny_hf_model_dir)
        )
    )
    listing = client.get("/api/stores").json()
    names = [item["name"] for item in listing["items"]]
    assert STORE in names and "escape" not in names
    demo = next(item for item in listing["items"] if item["name"] == STORE)
    assert demo["n_prompts"] == len(PROMPTS) and demo["n_tokens"] == store.n_tokens()

    info = client.get(f"/api/stores/{STORE}").json()
    assert info["layout"]["sites"][1]["label"] == SITE and info["tokens_decoded"] is True
    assert info["shard_ids"] == [0, 1, 2]

    prompts = client.get(f"/api/stores/{STORE}/prompts", params={"limit": 3}).json()
    assert [p["text"] for p in prompts["items"]] == [p.text for p in PROMPTS[:3]]
    assert prompts["total"] == len(PROMPTS)

    detail = client.get(f"/api/stores/{STORE}/prompts/2").json()
    assert detail["token_ids"] == store.prompt_tokens(2).tolist()
    assert detail["tokens"] == [tokenizer.decode([t]) for t in detail["token_ids"]]

    at = client.get(
        f"/api/stores/{STORE}/sites/{SITE}/prompts/2/positions/{len(detail['token_ids']) - 1}/features",
        params={"limit": 5},
    ).json()
    direct = features_at(store, SITE, 2, len(detail["token_ids"]) - 1, limit=5)
    assert at["features"] == direct.model_dump(mode="json")
    assert at["token"] == detail["tokens"][-1]
    assert any(value != 0 for value in at["features"]["attributions"])

    feature = direct.feature_ids[0]
    examples = client.get(
        f"/api/stores/{STORE}/sites/{SITE}/features/{feature}/examples",
        params={"limit": 4, "context": 3},
    ).json()
    expected = top_examples(store, SITE, feature, n=4, context=3)
    assert [e["activation"] for e in examples["examples"]] == [e.activation for e in expected]
    for got, want in zip(examples["examples"], expected, strict=True):
        assert got["context_token_ids"] == want.context_token_ids
        assert got["context"][got["hit_index"]] == tokenizer.decode(
            [want.context_token_ids[want.hit_index]]
        )

    summary = client.get(f"/api/stores/{STORE}/sites/{SITE}/features/{feature}/summary").json()
    assert summary == feature_summary(store, SITE, feature).model_dump(mode="json")
    assert summary["count"] > 0


def test_job_results(client):
    base = f"/api/stores/{STORE}/results"
    kinds = {item["kind"] for item in client.get(base).json()}
    assert kinds == {"attribute", "splice_eval", "dfa"}
    page = client.get(f"{base}/attribution", params={"offset": 1, "limit": 3}).json()
    assert page["total"] == len(NODES) and page["method"] == "atpstar"
    assert page["nodes"] == [n.model_dump(mode="json") for n in NODES[1:4]]
    assert page["nodes"][0]["verification"]["status"] == "confirmed"
    assert page["nodes"][1]["verification"] is None
    splice = client.get(f"{base}/splice-eval").json()
    assert splice["rows"] == [r.model_dump(mode="json") for r in SPLICE_ROWS]
    assert "no ablation_scan result" in _error(client.get(f"{base}/ablation"), 404)
    scan = "/api/stores/scan/results"
    assert [item["kind"] for item in client.get(scan).json()] == ["ablation_scan"]
    ablation = client.get(f"{scan}/ablation", params={"offset": 4, "limit": 5}).json()
    assert (ablation["site"], ablation["mode"], ablation["baseline_mean"]) == (SITE, "zero", 3.1)
    assert (ablation["offset"], ablation["limit"], ablation["total"]) == (4, 5, 6)
    assert ablation["features"] == [f.model_dump(mode="json") for f in ABLATION.features[4:]]
    assert "no attribute result" in _error(client.get(f"{scan}/attribution"), 404)
    dfa = client.get(f"{base}/dfa", params={"offset": 1, "limit": 2}).json()
    assert (dfa["site"], dfa["position"], dfa["total"]) == ("L1.z", "END", len(DFA_FEATURES))
    assert dfa["features"] == [f.model_dump(mode="json") for f in DFA_FEATURES[1:3]]
    _error(client.get(f"{base}/attribution", params={"limit": MAX_PAGE + 1}), 422)


def test_prompt_features_agree_with_single_positions(client):
    whole = client.get(
        f"/api/stores/{STORE}/sites/{SITE}/prompts/0/features", params={"limit": 3}
    ).json()
    assert len(whole["positions"]) == len(whole["tokens"]) > 3
    for position in (0, len(whole["tokens"]) - 1):
        one = client.get(
            f"/api/stores/{STORE}/sites/{SITE}/prompts/0/positions/{position}/features",
            params={"limit": 3},
        ).json()
        assert whole["positions"][position] == one["features"]


def test_pagination_is_bounded_and_complete(client):
    url = f"/api/stores/{STORE}/sites/{SITE}/summaries"
    for bad in ({"limit": 0}, {"limit": MAX_PAGE + 1}, {"offset": -1}, {"limit": "many"}):
        assert "limit" in _error(client.get(url, params=bad), 422) or "offset" in str(bad)
    seen: list[int] = []
    offset = 0
    while True:
        page = client.get(url, params={"offset": offset, "limit": 7, "order": "count"}).json()
        assert page["limit"] == 7 and len(page["items"]) <= 7
        if not page["items"]:
            break
        seen += [item["feature"] for item in page["items"]]
        offset += 7
    assert sorted(seen) == list(range(page["total"])) and page["total"] == 48
    counts = [client.get(f"{url}", params={"offset": 0, "limit": MAX_PAGE, "order": "count"})]
    values = [item["count"] for item in counts[0].json()["items"]]
    assert values == sorted(values, reverse=True)
    assert client.get(url, params={"limit": MAX_PAGE}).status_code == 200
    beyond = client.get(f"/api/stores/{STORE}/prompts", params={"offset": 1000}).json()
    assert beyond["items"] == [] and beyond["total"] == len(PROMPTS)


def test_errors_are_json_with_the_right_status(client):
    base = f"/api/stores/{STORE}"
    assert "no store" in _error(client.get("/api/stores/nothing-here"), 404)
    assert "unknown site" in _error(client.get(f"{base}/sites/L9.z/features/0/summary"), 404)
    assert "out of range" in _error(client.get(f"{base}/sites/{SITE}/features/48/summary"), 404)
    assert "out of range" in _error(client.get(f"{base}/prompts/{len(PROMPTS)}"), 404)
    _error(client.get(f"{base}/sites/{SITE}/prompts/0/positions/999/features"), 404)
    _error(client.get(f"{base}/sites/{SITE}/features/abc/summary"), 422)
    _error(client.get("/api/nowhere"), 404)
    _error(client.delete(f"{base}"), 405)
    _error(client.get("/api/jobs"), 503)  # this server has no Ray job server configured


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "%2e%2e",
        "..%2F..%2Fetc",
        "%2Fetc%2Fpasswd",
        "a..b",
        "demo%2F..%2F..%2Foutside",
        "~root",
        "..%5C..%5Cwindows",
        "escape",  # a symlink to a store outside the root
        "leaky",  # a store that links a file outside the root
        ".hidden",
    ],
)
def test_path_traversal_is_refused(client, name):
    response = client.get(f"/api/stores/{name}")
    assert 400 <= response.status_code < 500, response.text
    assert "root:x" not in response.text and "layout" not in response.text
    _error(response, response.status_code)
    deep = client.get(f"/api/stores/{name}/sites/{SITE}/features/0/summary")
    assert 400 <= deep.status_code < 500 and "count" not in deep.text


def test_mutations_need_a_valid_token(client):
    spec = {
        "prompts": {"kind": "ioi", "n": 2},
        "saes": [{"source": "default/L15.z"}],
        "job": {"kind": "cache"},
        "store": "x",
    }
    body = {"spec": spec}
    missing = client.post("/api/jobs", json=body)
    assert "bearer token is required" in _error(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "not accepted" in _error(
        client.post("/api/jobs", json=body, headers={"Authorization": "Bearer nope"}), 403
    )
    _error(client.post("/api/jobs", json=body, headers={"Authorization": "Basic dTpw"}), 401)
    _error(client.post("/api/jobs/raysubmit_x/cancel"), 401)
    _error(client.post("/api/jobs/raysubmit_x/cancel", headers={"Authorization": "Bearer x"}), 403)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # With a valid token the request gets past auth: store names are checked, then Ray.
    for bad_store in ("../elsewhere", "/abs/path", "a/b"):
        bad = {"spec": spec | {"store": bad_store}}
        assert "invalid store name" in _error(client.post("/api/jobs", json=bad, headers=auth), 400)
    _error(client.post("/api/jobs", json={"spec": {"store": "x"}}, headers=auth), 422)
    assert "not enabled" in _error(client.post("/api/jobs", json=body, headers=auth), 503)


def test_oversize_bodies_get_413(client):
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    big = b'{"spec": "' + b"x" * (MAX_BODY + 10) + b'"}'
    assert "larger than the limit" in _error(
        client.post("/api/jobs", content=big, headers=auth), 413
    )
    # Unauthenticated and chunked (no Content-Length) bodies are cut off too.
    _error(client.post("/api/jobs", content=big), 413)

    def chunks():
        for _ in range(20):
            yield b"y" * 8192

    _error(client.post("/api/jobs", content=chunks(), headers=auth), 413)
    small = client.post("/api/jobs", content=b"{}", headers=auth)
    assert small.status_code == 422


def test_reads_can_require_a_token(store_root):
    settings = ApiSettings(store_root=store_root, tokens=(SecretStr(TOKEN),), protect_reads=True)
    with thread_server(settings) as url:
        assert httpx.get(f"{url}/api/stores").status_code == 401
        bad = httpx.get(f"{url}/api/stores", headers={"Authorization": "Bearer no"})
        assert bad.status_code == 403
        ok = httpx.get(f"{url}/api/stores", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["total"] >= 1
        assert httpx.get(f"{url}/web/").status_code == 200  # static page, no data


def test_damaged_stores_answer_409_naming_the_object(client):
    listing = client.get("/api/stores", params={"limit": 100}).json()
    assert [d["name"] for d in listing["damaged"]] == ["damaged-layout"]
    assert "zarr.json" in listing["damaged"][0]["reason"]
    manifest = client.get(f"/api/stores/damaged-manifest/sites/{SITE}/summaries")
    assert "manifest/000001.json" in _error(manifest, 409)
    index = client.get(f"/api/stores/damaged-index/sites/{SITE}/summaries")
    assert "index" in _error(index, 409)
    result = client.get("/api/stores/damaged-result/results/attribution")
    assert "results/attribute.json" in _error(result, 409)
    assert "zarr.json" in _error(client.get("/api/stores/damaged-layout"), 409)


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--include-path-regex",
        "^/api/(stores|health)",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        # The stateful phase follows the schema's links from the store listing into
        # the real store, so every route is exercised with existing names too.
        "--phases",
        "coverage,fuzzing,stateful",
        "--max-examples",
        "10",
        "--max-time",
        "20",
        "--seed",
        "1",
        "--workers",
        "2",
        "--generation-database",
        "none",
        "--no-color",
    ]
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert time.monotonic() - started < 60
    assert "passed" in output.lower()


@pytest.mark.parametrize("protect_reads", [False, True])
def test_openapi_marks_only_what_needs_a_token(tmp_path, protect_reads):
    from circuitscan.services.api import ApiSettings, create_app

    settings = ApiSettings(store_root=str(tmp_path), protect_reads=protect_reads)
    schema = create_app(settings).openapi()
    secured = {
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if op.get("security")
    }
    reads = {("GET", path) for path, item in schema["paths"].items() if "get" in item} - {
        ("GET", "/api/health")
    }
    assert {("POST", "/api/jobs"), ("POST", "/api/jobs/{job_id}/cancel")} <= secured
    assert ("GET", "/api/stores") in reads
    assert (reads <= secured) if protect_reads else not (reads & secured), sorted(reads & secured)
