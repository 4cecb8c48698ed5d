"""The corruption battery: every object a store's readers trust, damaged four ways.

One small real store (tiny Llama, two sites, three shards, a job result) is
built once; each case damages one object of a copy of it (truncate, flip a
byte, replace with another valid object of the same kind, delete) and every
reader is asked: the Python API, the CLI (``query``, ``results``, ``verify``;
in-process through typer, exit status and output as a user sees them) and
the HTTP API (one real server over a root holding every damaged copy).
Each answer must equal the undamaged store's or report the damage (a
StoreCorruptionError / exit 3 with one ``error:`` line / a 409 JSON error),
naming the damaged object; never different data. ``verify`` must find every
case (a deleted result document too: the job record lists what the job
wrote), and ``repair`` must restore, byte for byte and without a model, the
merged index, the layout document and the job record. Damage that needs the
job's model (shards, manifest entries, results) is repaired byte for byte by
a real job in tests/integration/test_jobs.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from api_server import PROMPTS, SITES, build_store, thread_server
from typer.testing import CliRunner

from circuitscan.schemas.errors import StoreCorruptionError
from circuitscan.schemas.job_results import AttributionJobResult, NodeEffect
from circuitscan.services.api import ApiSettings
from circuitscan.services.cli import app
from circuitscan.services.store import FeatureStore, feature_summary, features_at, top_examples
from circuitscan.services.store.integrity import verify_store
from circuitscan.services.store.results import read_result, write_job_result
from circuitscan.testing.corruption import (
    DAMAGES,
    KINDS,
    REPAIRED_WITHOUT_MODEL,
    ObjectCase,
    damage,
    object_cases,
    store_files,
)

pytestmark = pytest.mark.integration

SITE = SITES[1].label
RESULT = AttributionJobResult(
    job_hash="api-test",
    method="atp",
    n_prompts=len(PROMPTS),
    n_nodes=3,
    n_verified=0,
    top=[
        NodeEffect(node=f"feature:{SITE}:{i}@last", mean=0.5 - i / 8, mean_abs=0.5, n_prompts=5)
        for i in range(3)
    ],
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_hf_model_dir) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "pristine"
    write_job_result(build_store(path, tiny_hf_model_dir), RESULT)
    return path


CASES = [(kind, how) for kind in KINDS for how in DAMAGES]


@pytest.fixture(scope="module")
def objects(pristine, tmp_path_factory) -> dict[str, ObjectCase]:
    return object_cases(pristine, SITE, "attribute", tmp_path_factory.mktemp("scratch"))


def _names(case: ObjectCase, message: str) -> bool:
    return any(name in message for name in case.names)


def _answers(url: str) -> dict[str, Callable[[], object]]:
    """Every Python reader, as calls (each opens the store afresh)."""

    def summaries() -> list[object]:
        store = FeatureStore.open(url)
        return [feature_summary(store, SITE, f).model_dump() for f in range(48)]

    def points() -> list[object]:
        store = FeatureStore.open(url)
        return [
            features_at(store, site.label, p, 1).model_dump()
            for site in SITES
            for p in range(len(PROMPTS))
        ]

    def examples() -> list[object]:
        store = FeatureStore.open(url)
        return [[e.model_dump() for e in top_examples(store, SITE, f, 4)] for f in (0, 7, 21)]

    def records() -> list[object]:
        store = FeatureStore.open(url)
        return [[r.model_dump() for r in store.prompt_records(i)] for i in range(3)]

    return {
        "summary": summaries,
        "features_at": points,
        "top_examples": examples,
        "result": lambda: read_result(url, "attribute").model_dump(),
        "prompts": records,
    }


def _outcome(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return "value", call()
    except StoreCorruptionError as exc:
        return "damage", str(exc)
    except Exception as exc:  # any other error fails the case, with its type
        return type(exc).__name__, str(exc)


@pytest.fixture(scope="module")
def battery(pristine, objects, tmp_path_factory):
    """Every damaged copy, the undamaged answers, and a server over all the copies."""
    root = tmp_path_factory.mktemp("damaged")
    copies: dict[tuple[str, str], Path] = {}
    for kind, how in CASES:
        copy = root / f"{kind.replace(' ', '-')}-{how}"
        shutil.copytree(pristine, copy)
        damage(copy, objects[kind].key, how, objects[kind].other)
        copies[(kind, how)] = copy
    shutil.copytree(pristine, root / "pristine")
    baseline = {name: call() for name, call in _answers(str(pristine)).items()}
    settings = ApiSettings(store_root=str(root), store_refresh_seconds=0)
    with thread_server(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield copies, baseline, http, objects


@pytest.mark.parametrize(("kind", "how"), CASES, ids=[f"{k}-{h}" for k, h in CASES])
def test_every_reader_answers_right_or_names_the_damage(battery, kind, how):
    copies, baseline, http, objects = battery
    url = str(copies[(kind, how)])
    words = objects[kind]
    for name, call in _answers(url).items():
        status, value = _outcome(call)
        if status == "value":
            assert value == baseline[name], f"{name}: silently different data"
        else:
            assert status == "damage", f"{name}: {status}: {value}"
            assert _names(words, str(value)) and "\n" not in str(value), (name, value)
    # The CLI: the same answer, or one line naming the damage and exit 3.
    runner = CliRunner()
    for args in (
        ["query", url, "summary", "--site", SITE, "--feature", "3", "--no-decode"],
        ["results", url, "--kind", "attribute", "--json"],
    ):
        result = runner.invoke(app, args)
        if result.exit_code != 0:
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), result.output
            assert result.exit_code == 3 and _names(words, lines[0]), (args, result.output)
    verified = runner.invoke(app, ["verify", url])
    assert verified.exit_code == 3, verified.output
    assert any(_names(words, line) for line in verified.output.splitlines()), verified.output
    # HTTP: the same data or a 409 JSON error naming the object, never a traceback.
    name = Path(url).name
    for path in (
        f"/api/stores/{name}/sites/{SITE}/features/3/summary",
        f"/api/stores/{name}/sites/{SITE}/prompts/3/positions/1/features",
        f"/api/stores/{name}/results",
    ):
        response = http.get(path)
        assert "Traceback" not in response.text
        if (kind, how) == ("layout document", "delete"):  # no layout: no store by that name
            assert response.status_code == 404, response.text
        elif response.status_code != 200:
            assert response.status_code == 409, response.text
            assert set(response.json()) == {"error"}
            assert _names(words, response.json()["error"]), response.text


def test_the_listing_survives_every_damaged_store(battery):
    copies, _baseline, http, _objects = battery
    page = http.get("/api/stores", params={"limit": 100})
    assert page.status_code == 200, page.text
    body = page.json()
    listed = {item["name"] for item in body["items"]} | {d["name"] for d in body["damaged"]}
    # A folder whose layout document was deleted holds no store to list.
    stores = {p.name for p in copies.values()} - {"layout-document-delete"}
    assert listed == stores | {"pristine"}
    damaged = {d["name"]: d["reason"] for d in body["damaged"]}
    assert set(damaged) == {f"layout-document-{how}" for how in ("truncate", "flip", "replace")}
    assert all("zarr.json" in reason for reason in damaged.values())
    by_name = {item["name"]: item for item in body["items"]}
    for how in ("truncate", "flip", "replace"):
        assert by_name[f"manifest-entry-{how}"]["damaged_shards"] == [1]


def test_verify_passes_an_undamaged_store_and_names_every_problem(pristine, battery):
    assert verify_store(str(pristine)).ok
    copies, _baseline, _http, objects = battery
    for (kind, how), path in copies.items():
        report = verify_store(str(path))
        assert not report.ok, (kind, how)
        assert any(_names(objects[kind], p.message) for p in report.problems), report.problems


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", REPAIRED_WITHOUT_MODEL)
def test_repair_restores_what_needs_no_model_byte_for_byte(pristine, objects, tmp_path, kind, how):
    copy = tmp_path / "store"
    shutil.copytree(pristine, copy)
    damage(copy, objects[kind].key, how, objects[kind].other)
    result = CliRunner().invoke(app, ["repair", str(copy)])
    assert result.exit_code == 0, result.output
    assert store_files(copy) == store_files(pristine)


def test_the_index_is_the_same_bytes_whatever_the_commit_order(pristine, tmp_path):
    copy = tmp_path / "reordered"
    shutil.copytree(pristine, copy)
    entries = FeatureStore.open(str(copy)).committed_entries()
    shutil.rmtree(copy / "manifest")
    shutil.rmtree(copy / "index")
    store = FeatureStore.open(str(copy))
    for shard_id in (2, 0, 1):  # another order than the one the store was written in
        assert store.commit_shard(entries[shard_id])
    store.flush_index()
    assert store_files(copy) == store_files(pristine)
