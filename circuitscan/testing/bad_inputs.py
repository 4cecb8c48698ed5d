"""User mistakes the CLI must answer with one clear line (exit 2), never a traceback.

One list, :data:`BAD_INPUTS`, that tests and ``bench/reliability.py`` run
alike; a new mistake found is appended here. Each case builds its command
line in a scratch folder (writing whatever bad file it needs) given a good
store to point at; :func:`run_bad_input` runs it through the real CLI in
process and says whether it ended in a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BadInput:
    """One user mistake: a name and its command line (from a scratch folder and a store)."""

    name: str
    args: Callable[[Path, Path], list[str]]


def _file(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _jsonl(folder: Path, **row: str) -> dict[str, str]:
    """A JSONL prompt source of one labelled prompt, with ``row``'s fields changed."""
    base = {"text": "When Mary and John went out, John gave it to", "answer": " Mary"}
    base |= {"wrong": " John"} | row
    return {"kind": "jsonl", "path": _file(folder, "prompts.jsonl", json.dumps(base).encode())}


def _point(store: Path) -> list[str]:
    return ["query", str(store), "features-at", "--prompt", "0", "--position", "0"]


def _run_spec(folder: Path, **fields: object) -> list[str]:
    """``circuitscan run`` of a spec on the default model and SAE with ``fields`` changed."""
    spec: dict[str, object] = {
        "name": "bad-input",
        "saes": [{"source": "default/L15.resid_post"}],
        "prompts": {"kind": "ioi", "n": 2},
        "job": {"kind": "cache"},
        "store": str(folder / "store"),
    }
    return ["run", _file(folder, "spec.json", json.dumps(spec | fields).encode())]


BAD_INPUTS: list[BadInput] = [
    BadInput(
        "store that does not exist", lambda tmp, store: ["query", str(tmp / "nowhere"), "summary"]
    ),
    BadInput("store path that is a file", lambda tmp, store: ["verify", _file(tmp, "f.txt", b"x")]),
    BadInput(
        "prompt out of range",
        lambda tmp, store: [
            "query",
            str(store),
            "features-at",
            "--prompt",
            "99",
            "--position",
            "0",
        ],
    ),
    BadInput(
        "unknown site",
        lambda tmp, store: ["query", str(store), "summary", "--site", "L9.z", "--feature", "0"],
    ),
    BadInput(
        "negative feature",
        lambda tmp, store: ["query", str(store), "top-examples", "--feature", "-3"],
    ),
    BadInput("no job result", lambda tmp, store: ["results", str(store), "--kind", "dfa"]),
    BadInput("spec file missing", lambda tmp, store: ["run", str(tmp / "missing.yaml")]),
    BadInput(
        "spec not YAML", lambda tmp, store: ["run", _file(tmp, "bad.yaml", b"name: [unclosed")]
    ),
    BadInput(
        "spec not UTF-8", lambda tmp, store: ["run", _file(tmp, "latin.yaml", b"name: caf\xe9\n")]
    ),
    BadInput(
        "spec of the wrong shape",
        lambda tmp, store: ["run", _file(tmp, "shape.yaml", b"- 1\n- 2\n")],
    ),
    BadInput("resume a folder with no store", lambda tmp, store: ["resume", str(tmp)]),
    BadInput("repair a folder with no store", lambda tmp, store: ["repair", str(tmp)]),
    # Job inputs the driver refuses before Ray, the lease or the store (default model's files).
    BadInput(
        "prompt text file not UTF-8",
        lambda tmp, store: _run_spec(
            tmp, prompts={"kind": "text", "path": _file(tmp, "p.txt", b"a\n\xff\xfe b\n")}
        ),
    ),
    BadInput(
        "prompt JSONL file not UTF-8",
        lambda tmp, store: _run_spec(
            tmp, prompts={"kind": "jsonl", "path": _file(tmp, "p.jsonl", b'{"text": "\xff"}\n')}
        ),
    ),
    BadInput(
        "model path that does not exist",
        lambda tmp, store: _run_spec(tmp, model={"source": str(tmp / "no-model")}),
    ),
    BadInput(
        "unknown default SAE", lambda tmp, store: _run_spec(tmp, saes=[{"source": "default/L9.x"}])
    ),
    BadInput(
        "SAE folder that does not exist",
        lambda tmp, store: _run_spec(tmp, saes=[{"source": str(tmp / "no-sae")}]),
    ),
    BadInput(
        "answer of several tokens",
        lambda tmp, store: _run_spec(tmp, prompts=_jsonl(tmp, answer=" Maryland Jones")),
    ),
    BadInput("empty answer", lambda tmp, store: _run_spec(tmp, prompts=_jsonl(tmp, answer=""))),
    BadInput(
        "clean and corrupted prompts of unequal token lengths",
        lambda tmp, store: _run_spec(
            tmp,
            prompts=_jsonl(
                tmp, corrupted="When Alice and Bob went on a long walk, Carl gave it to"
            ),
            job={"kind": "attribute", "nodes": ["z"]},
        ),
    ),
    BadInput(
        "job store path that is a file",
        lambda tmp, store: _run_spec(tmp, store=_file(tmp, "store.txt", b"x")),
    ),
    BadInput(
        "negative --limit",
        lambda tmp, store: [*_point(store), "--limit", "-1"],
    ),
    BadInput(
        "negative --n",
        lambda tmp, store: ["query", str(store), "top-examples", "--feature", "0", "--n", "-5"],
    ),
    BadInput("negative --top", lambda tmp, store: ["results", str(store), "--top", "-1"]),
]


def run_bad_input(case: BadInput, scratch: Path, store: Path) -> tuple[int, bool, str]:
    """Run ``case`` through the CLI in process: (exit status, ended in a traceback, output)."""
    from typer.testing import CliRunner

    from circuitscan.services.cli import app

    scratch.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(app, case.args(scratch, store))
    traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
    return result.exit_code, traceback, result.output
