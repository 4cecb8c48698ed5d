"""Errors as a user meets them: the CLI's exit status and message, the HTTP API's status and body.

Real stores on disk (the contract suite's tiny shards), damaged the way disks
and interrupted copies damage them: a chunk's bytes altered in place, a
manifest entry and a job result overwritten with garbage. A user mistake is
exit 2 / a 4xx naming the problem; a damaged store is exit 3 / a 409 naming
the damaged object (a conflict with the stored state, not a server bug: 500 is
kept for bugs); neither ever shows a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from api_server import thread_server
from typer.testing import CliRunner

from circuitscan.services.api import ApiSettings
from circuitscan.services.cli import app
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.backends import write_bytes
from circuitscan.testing.corruption import damage, member_key
from circuitscan.testing.store_contract import SITES, contract_shards, fill_store, make_layout

pytestmark = pytest.mark.integration

SITE = SITES[0].label
DAMAGED_CHUNK = member_key(1, f"sites/{SITE}/activations/c/0")  # inside shard 1's pack
DAMAGED_PROMPT = 3  # the first prompt of shard 1 (shard size 3)
GARBAGE = b'{"shard_id": 2, "trunc'


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """A store root: ``good`` intact, ``damaged`` with one altered chunk in shard 1,
    ``bad-manifest`` with shard 2's manifest entry and ``bad-result`` with its job
    result overwritten."""
    root = tmp_path_factory.mktemp("errors") / "stores"
    root.mkdir()
    fill_store(str(root / "good"), contract_shards())
    for name in ("damaged", "bad-manifest", "bad-result"):
        shutil.copytree(root / "good", root / name)
    damage(root / "damaged", DAMAGED_CHUNK, "flip")
    write_bytes(
        FeatureStore.open(str(root / "bad-manifest")).backend, "manifest/000002.json", GARBAGE
    )
    write_bytes(
        FeatureStore.open(str(root / "bad-result")).backend, "results/attribute.json", GARBAGE
    )
    return root


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    # Only typer.Exit (SystemExit) may end the command: any other exception is a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _features_at(store: Path, prompt: int) -> list[str]:
    return [
        "query", str(store), "features-at", "--site", SITE,
        "--prompt", str(prompt), "--position", "0", "--no-decode",
    ]  # fmt: skip


# --- CLI ------------------------------------------------------------------------------


def test_cli_user_mistakes_exit_2_with_one_clear_line(stores, tmp_path):
    outside = _cli(*_features_at(stores / "good", 99))
    assert outside.exit_code == 2
    assert outside.output.strip() == (
        "error: prompt 99 is out of range: the store holds prompts 0..7"
    ), outside.output
    missing = _cli("query", str(tmp_path / "nowhere"), "summary")
    assert (
        missing.exit_code == 2 and f"no feature store at {tmp_path / 'nowhere'}" in missing.output
    )
    assert not (tmp_path / "nowhere").exists()
    site = _cli("query", str(stores / "good"), "summary", "--site", "L7.z", "--feature", "0")
    assert site.exit_code == 2 and "unknown site 'L7.z'" in site.output
    no_result = _cli("results", str(stores / "good"))
    assert no_result.exit_code == 2 and "holds no job result" in no_result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--limit", "-1"), "--limit must be at least 1, got -1"),
        (("--limit", "0"), "--limit must be at least 1, got 0"),
        (("--context", "-2"), "--context must be at least 0, got -2"),
    ],
)
def test_cli_refuses_counts_out_of_range(stores, args, message):
    result = _cli(*_features_at(stores / "good", 0), *args)
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output


def test_cli_top_and_n_below_one_are_refused(stores):
    good = str(stores / "good")
    examples = _cli("query", good, "top-examples", "--site", SITE, "--feature", "0", "--n", "-5")
    assert examples.exit_code == 2
    assert examples.output.strip() == "error: --n must be at least 1, got -5"
    top = _cli("results", good, "--top", "-1")
    assert top.exit_code == 2 and top.output.strip() == "error: --top must be at least 1, got -1"


def test_cli_messages_fit_stores_without_prompts_or_sites(tmp_path):
    empty = tmp_path / "empty"
    FeatureStore.create(str(empty), make_layout())
    result = _cli(*_features_at(empty, 0))
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: prompt 0 is out of range: the store holds no prompts yet (no shard is committed)"
    )
    results_only = tmp_path / "attribute"
    FeatureStore.create(
        str(results_only),
        make_layout(sites=[], job_spec={"name": "a", "job": {"kind": "attribute"}}),
    )
    for args in (("summary", "--feature", "0"), ("top-examples", "--feature", "0")):
        answer = _cli("query", str(results_only), *args)
        assert answer.exit_code == 2
        assert answer.output.strip() == (
            "error: this store holds no cached SAE features, only a job result (attribute): "
            f"`circuitscan results {results_only}` prints it"
        )


def test_cli_damaged_store_exits_3_naming_the_damaged_object(stores):
    shard = _cli(*_features_at(stores / "damaged", DAMAGED_PROMPT))
    assert shard.exit_code == 3, shard.output
    assert f"shard 1 of {stores / 'damaged'} is corrupt" in shard.output
    assert "activations" in shard.output
    assert _cli(*_features_at(stores / "damaged", 0)).exit_code == 0  # other shards still read

    manifest = _cli("query", str(stores / "bad-manifest"), "summary")
    assert manifest.exit_code == 3, manifest.output
    assert "manifest entry manifest/000002.json" in manifest.output
    assert "unreadable" in manifest.output

    result = _cli("results", str(stores / "bad-result"), "--kind", "attribute")
    assert result.exit_code == 3, result.output
    assert f"job result results/attribute.json of {stores / 'bad-result'} is unreadable" in (
        result.output
    )


def test_cli_process_reports_a_damaged_shard_without_traceback(stores):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "circuitscan.services.cli", *_features_at(stores / "damaged", 3)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    # The store's own warning may come first; the error is the last line.
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: shard 1 of ") and "is corrupt" in last, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# --- HTTP API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(stores):
    with thread_server(ApiSettings(store_root=str(stores))) as url:
        yield url


def _features_url(server: str, store: str, prompt: int) -> str:
    return f"{server}/api/stores/{store}/sites/{SITE}/prompts/{prompt}/positions/0/features"


def test_api_user_mistakes_are_4xx_with_the_error_body(server):
    outside = httpx.get(_features_url(server, "good", 99), timeout=60)
    assert outside.status_code == 404
    assert outside.json() == {"error": "prompt 99 is out of range: the store holds prompts 0..7"}
    no_result = httpx.get(f"{server}/api/stores/good/results/attribution", timeout=60)
    assert no_result.status_code == 404
    assert "holds no attribute result" in no_result.json()["error"]


def test_api_damaged_store_is_a_409_naming_the_object_not_a_traceback(server, stores):
    shard = httpx.get(_features_url(server, "damaged", DAMAGED_PROMPT), timeout=60)
    assert shard.status_code == 409
    assert shard.headers["content-type"].startswith("application/json")
    body = shard.json()
    assert list(body) == ["error"] and "Traceback" not in shard.text
    # A client knows the store by its name: the server's folders are not in the message.
    assert "shard 1 of damaged is corrupt" in body["error"], body
    assert str(stores) not in body["error"] and str(stores.resolve()) not in body["error"]
    assert httpx.get(_features_url(server, "damaged", 0), timeout=60).status_code == 200

    manifest = httpx.get(f"{server}/api/stores/bad-manifest", timeout=60)
    assert manifest.status_code == 409
    assert "manifest entry manifest/000002.json" in manifest.json()["error"]

    result = httpx.get(f"{server}/api/stores/bad-result/results/attribution", timeout=60)
    assert result.status_code == 409
    assert "job result results/attribute.json" in result.json()["error"]
