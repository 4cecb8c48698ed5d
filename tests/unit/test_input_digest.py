"""Prompts identified by content: the record a store keeps of its prompts, on real folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuitscan.schemas.jobs import CacheParams, JobSpec, JsonlSource
from circuitscan.schemas.models import SAESpec
from circuitscan.services.jobs.input_digest import (
    CorruptInputsError,
    PromptsChangedError,
    check_inputs,
    prompts_digest,
    record_inputs,
)
from circuitscan.services.jobs.prompt_sources import load_prompts
from circuitscan.services.store.store_keys import INPUTS_KEY, is_store_key


def _write(path: Path, texts: list[str], blank_lines: bool = False) -> None:
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")


def _spec(tmp_path: Path) -> JobSpec:
    return JobSpec(
        prompts=JsonlSource(kind="jsonl", path=str(tmp_path / "prompts.jsonl")),
        saes=[SAESpec(source="sae")],  # never loaded: only the prompts are read
        job=CacheParams(kind="cache"),
        store=str(tmp_path / "store"),
    )


def _load(spec: JobSpec):
    return load_prompts(spec.prompts, lambda: None)


def test_an_edited_prompt_file_is_refused_naming_the_file_and_both_digests(tmp_path):
    spec = _spec(tmp_path)
    _write(tmp_path / "prompts.jsonl", ["one", "two"])
    first = _load(spec)
    record_inputs(spec, first)
    assert is_store_key(INPUTS_KEY) and (tmp_path / "store" / INPUTS_KEY).is_file()
    check_inputs(spec, _load(spec))  # unchanged: fine

    _write(tmp_path / "prompts.jsonl", ["one", "two"], blank_lines=True)
    check_inputs(spec, _load(spec))  # a blank line changes no prompt

    _write(tmp_path / "prompts.jsonl", ["one", "TWO"])
    edited = _load(spec)
    with pytest.raises(PromptsChangedError) as caught:
        check_inputs(spec, edited)
    message = str(caught.value)
    assert str(tmp_path / "prompts.jsonl") in message
    assert prompts_digest(first)[:16] in message and prompts_digest(edited)[:16] in message
    assert caught.value.exit_code == 2 and caught.value.http_status == 409

    record_inputs(spec, edited)  # the first record stays: it is what the store holds
    with pytest.raises(PromptsChangedError):
        check_inputs(spec, edited)


def test_the_digest_follows_content_and_order_not_the_file(tmp_path):
    a = _spec(tmp_path)
    _write(tmp_path / "prompts.jsonl", ["x", "y"])
    records = _load(a)
    assert prompts_digest(records) == prompts_digest(list(records))
    assert prompts_digest(records) != prompts_digest(records[::-1])
    labelled = [records[0].model_copy(update={"answer": " y"}), records[1]]
    assert prompts_digest(labelled) != prompts_digest(records)


def test_a_store_without_a_record_gets_one_and_a_torn_one_is_named(tmp_path):
    spec = _spec(tmp_path)
    _write(tmp_path / "prompts.jsonl", ["one"])
    check_inputs(spec, _load(spec))  # no store, no record: nothing to compare
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / INPUTS_KEY).write_text('{"source": "x", "pro')
    with pytest.raises(CorruptInputsError, match=rf"{INPUTS_KEY} of .*store.* is unreadable"):
        check_inputs(spec, _load(spec))
