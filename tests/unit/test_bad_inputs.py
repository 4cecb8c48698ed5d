"""Every user mistake in a job's input is one line, exit status 2, and leaves no store behind.

The CLI runs in process (``circuitscan run`` / ``resume`` through typer's
runner): each mistake here is found on the driver before Ray, the lease or
the store, so nothing but the driver is involved, and the test checks that
only ``typer.Exit`` ended the command (anything else would be a traceback)
and that the store folder was never made. The files are real: a tiny local
Hugging Face model, real sae_lens SAE folders, prompt files on disk.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from circuitscan.services.cli import app

NON_UTF8 = b"The cat sat\n\xff\xfe on the mat\n"


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _sae_copy(source: Path, target: Path, **changes: Any) -> str:
    """A copy of an SAE folder with its cfg.json changed (``hook_name`` goes in metadata)."""
    shutil.copytree(source, target)
    cfg = json.loads((target / "cfg.json").read_text(encoding="utf-8"))
    if "hook_name" in changes:
        cfg["metadata"]["hook_name"] = changes.pop("hook_name")
    cfg.update(changes)
    (target / "cfg.json").write_text(json.dumps(cfg), encoding="utf-8")
    return str(target)


PAIR = {"text": "When Mary and John went out, John gave it to", "answer": " Mary", "wrong": " John"}


def _non_utf8_prompts(tmp: Path, base: dict[str, Any], kind: str) -> dict[str, Any]:
    path = tmp / f"prompts.{kind}"
    path.write_bytes(NON_UTF8)
    return {**base, "prompts": {"kind": kind, "path": str(path)}}


def _answers(tmp: Path, base: dict[str, Any], **row: Any) -> dict[str, Any]:
    rows = [PAIR, {**PAIR, **row}]
    return {**base, "prompts": {"kind": "jsonl", "path": _jsonl(tmp / "p.jsonl", rows)}}


def _attribute(tmp: Path, base: dict[str, Any], corrupted: str) -> dict[str, Any]:
    row = {**PAIR, "corrupted": corrupted}
    source = {"kind": "jsonl", "path": _jsonl(tmp / "pairs.jsonl", [row])}
    return {**base, "prompts": source, "job": {"kind": "attribute", "nodes": ["z"]}}


# (case id, how to make the spec from (tmp folder, base spec, SAE folders), message fragment)
CASES: list[tuple[str, Callable[..., dict[str, Any]], str]] = [
    (
        "text-file-not-utf8",
        lambda tmp, base, saes: _non_utf8_prompts(tmp, base, "text"),
        "not UTF-8",
    ),
    (
        "jsonl-not-utf8",
        lambda tmp, base, saes: _non_utf8_prompts(tmp, base, "jsonl"),
        "not UTF-8",
    ),
    (
        "model-path-missing",
        lambda tmp, base, saes: {**base, "model": {"source": str(tmp / "no-such-model")}},
        "model path not found",
    ),
    (
        "model-path-a-file",
        lambda tmp, base, saes: {**base, "model": {"source": _jsonl(tmp / "weights.bin", [])}},
        "is not a Hugging Face model directory",
    ),
    (
        "sae-width-mismatch",
        lambda tmp, base, saes: {
            **base,
            "saes": [{"source": _sae_copy(saes[0], tmp / "wide", d_in=33)}],
        },
        "has d_in=33, which does not match blocks.0.hook_resid_post width 32",
    ),
    (
        "sae-layer-missing",
        lambda tmp, base, saes: {
            **base,
            "saes": [
                {"source": _sae_copy(saes[0], tmp / "deep", hook_name="blocks.7.hook_resid_post")}
            ],
        },
        "reads blocks.7.hook_resid_post, but the model has 2 layers (blocks 0..1)",
    ),
    (
        "sae-unknown-default",
        lambda tmp, base, saes: {**base, "saes": [{"source": "default/L99.nope"}]},
        "no default SAE named 'L99.nope'",
    ),
    (
        "sae-folder-missing",
        lambda tmp, base, saes: {**base, "saes": [{"source": str(tmp / "no-sae")}]},
        "SAE directory not found",
    ),
    (
        "answer-several-tokens",
        lambda tmp, base, saes: _answers(tmp, base, answer=" Maryland Jones"),
        "prompt 1: answer ' Maryland Jones' is 2 tokens",
    ),
    (
        "answer-empty",
        lambda tmp, base, saes: _answers(tmp, base, wrong=""),
        "prompt 1: the wrong is empty",
    ),
    (
        "corrupted-length-differs",
        lambda tmp, base, saes: _attribute(
            tmp, base, "When Alice and Bob went out on a long walk, Carl gave it to"
        ),
        "prompt 0: the clean and corrupted prompts have different token lengths",
    ),
    (
        "batch-too-big-for-memory",
        lambda tmp, base, saes: _long_prompt(tmp, base, saes),
        "prompt 0 runs to 12601 tokens (token cap 65536: the model's context); a batch of 1",
    ),
    (
        "store-a-file",
        lambda tmp, base, saes: {**base, "store": _jsonl(tmp / "store-file", [])},
        "exists and is not a directory",
    ),
]


def _wide_model(tmp: Path, model_dir: Path, sae_dir: Path) -> tuple[str, str]:
    """A model folder whose config is far larger than the tiny Llama's (its weights are never
    read: the memory check uses the config alone), and an SAE that fits its residual stream."""
    target = tmp / "wide-model"
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    config |= {
        "hidden_size": 256,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "num_hidden_layers": 64,
        "max_position_embeddings": 65536,
    }
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(target), _sae_copy(sae_dir, tmp / "wide-sae", d_in=256)


def _long_prompt(
    tmp: Path, base: dict[str, Any], saes: list[Path], **fields: Any
) -> dict[str, Any]:
    model, sae = _wide_model(tmp, Path(base["model"]["source"]), saes[0])
    text = " ".join(["the quick brown fox jumps over a lazy dog"] * 1400)  # 12,600 words
    source = {"kind": "jsonl", "path": _jsonl(tmp / "long.jsonl", [{"text": text}])}
    return {
        **base,
        "model": {"source": model},
        "saes": [{"source": sae}],
        "prompts": source,
        "metric": {"kind": "next_token_loss"},
        "overlong": "truncate",
        **fields,
    }


@pytest.fixture(scope="module")
def base_spec(tiny_hf_model_dir, tiny_hf_sae_dirs) -> Callable[[Path], dict[str, Any]]:
    def make(tmp: Path) -> dict[str, Any]:
        return {
            "name": "bad-input",
            "model": {"source": str(tiny_hf_model_dir)},
            "saes": [{"source": str(path)} for path in tiny_hf_sae_dirs],
            "prompts": {"kind": "jsonl", "path": _jsonl(tmp / "good.jsonl", [PAIR])},
            "job": {"kind": "cache"},
            "store": str(tmp / "store"),
        }

    return make


def _run(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    # Only typer.Exit (SystemExit) may end the command: anything else is a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_job_input_is_one_line_exit_2_and_no_store(
    make, message, base_spec, tiny_hf_sae_dirs, tmp_path
) -> None:
    spec = make(tmp_path, base_spec(tmp_path), tiny_hf_sae_dirs)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    result = _run("run", str(path))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
    if spec["store"] == str(tmp_path / "store"):
        assert not (tmp_path / "store").exists(), "a refused job left its store folder behind"


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"name: x\nstore: /tmp/x\n# caf\xe9\n")
    result = _run("run", str(spec))
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: spec file {spec} is not UTF-8 text: byte b'\\xe9' at offset 27 (line 3)"
    )


def test_resuming_a_store_path_that_is_a_file_is_one_line(tmp_path) -> None:
    path = tmp_path / "not-a-store"
    path.write_text("hello", encoding="utf-8")
    result = _run("resume", str(path))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: store path {path} exists and is not a directory"
    ]
    assert path.read_text(encoding="utf-8") == "hello"


def test_the_token_cap_bounds_the_memory_check(base_spec, tiny_hf_sae_dirs, tmp_path) -> None:
    from circuitscan.schemas.jobs import JobSpec
    from circuitscan.services.jobs.prompt_sources import load_prompts
    from circuitscan.services.jobs.spec_checks import check_prompts

    # The prompt that could not fit a batch at the model's context fits at a cap of 256.
    spec = JobSpec.model_validate(
        _long_prompt(tmp_path, base_spec(tmp_path), tiny_hf_sae_dirs, max_prompt_tokens=256)
    )
    check_prompts(spec, load_prompts(spec.prompts, lambda: None))


def test_a_worker_keeps_its_start_up_error_and_raises_it_as_itself(base_spec, tmp_path) -> None:
    from circuitscan.schemas.jobs import JobSpec
    from circuitscan.services.jobs.worker import ShardWorker
    from circuitscan.services.sae_loading import SAELoadError

    # Only a worker loads pretrained SAEs. An actor whose constructor raised would die, and the
    # driver would see Ray's ActorDiedError; this one answers every call with the error itself.
    spec = base_spec(tmp_path) | {"saes": [{"source": "pretrained:no-such-release/x"}]}
    worker = ShardWorker(JobSpec.model_validate(spec).model_dump_json())
    for call in (worker.describe, lambda: worker.verify_nodes([], [])):
        with pytest.raises(SAELoadError, match=r"^unknown sae_lens release 'no-such-release'$"):
            call()
