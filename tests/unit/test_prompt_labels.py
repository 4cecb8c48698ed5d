"""Extra JSONL keys and dataset columns kept as prompt labels (meta_columns), so results can be
broken down by them; sources without meta_columns read, dump and hash as before."""

from __future__ import annotations

import json

import pytest

from circuitscan.schemas.jobs import DatasetSource, JobSpec, JsonlSource
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.breakdown import BreakdownFieldError, field_values
from circuitscan.services.jobs.prompt_sources import PromptSourceError, load_prompts


def _jsonl(tmp_path, rows) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


ROWS = [
    {"text": "a b", "answer": " x", "difficulty": 2, "sport": "golf", "hard": True},
    {"text": "c d", "answer": " y", "difficulty": 1, "meta": {"group": "team"}, "sport": None},
]


def test_jsonl_keys_listed_in_meta_columns_become_labels(tmp_path):
    path = _jsonl(tmp_path, ROWS)
    listed = load_prompts(
        JsonlSource(kind="jsonl", path=path, meta_columns=["difficulty", "sport", "hard"]),
        lambda: None,
    )
    assert [r.meta for r in listed] == [
        {"difficulty": "2", "sport": "golf", "hard": "true"},
        {"group": "team", "difficulty": "1"},  # a null column is no label
    ]
    every = load_prompts(JsonlSource(kind="jsonl", path=path, meta_columns="all"), lambda: None)
    assert every == listed
    assert field_values(listed, "difficulty") == ["2", "1"]
    assert field_values(listed, "meta.sport") == ["golf", "(missing)"]
    # A key not listed is still refused (a misspelt field is not silently kept), in one line.
    with pytest.raises(PromptSourceError) as refused:
        load_prompts(JsonlSource(kind="jsonl", path=path, meta_columns=["sport"]), lambda: None)
    message = str(refused.value)
    assert "\n" not in message and "rows.jsonl:1: not a valid prompt record: difficulty" in message
    assert "prompts.meta_columns" in message


def test_jsonl_label_conflicts_and_nested_values_are_refused(tmp_path):
    clash = _jsonl(tmp_path, [{"text": "a", "group": "x", "meta": {"group": "y"}}])
    with pytest.raises(PromptSourceError, match="'group' is both a column"):
        load_prompts(JsonlSource(kind="jsonl", path=clash, meta_columns="all"), lambda: None)
    nested = _jsonl(tmp_path, [{"text": "a", "tags": ["p", "q"]}])
    with pytest.raises(PromptSourceError, match="column 'tags' holds a list"):
        load_prompts(JsonlSource(kind="jsonl", path=nested, meta_columns="all"), lambda: None)


def test_dataset_columns_become_labels(tmp_path):
    import datasets

    path = tmp_path / "ds"
    datasets.Dataset.from_dict(
        {
            "q": ["one two", "three four", "five six"],
            "a": [" x", " y", " z"],
            "source": ["wiki", "news", "wiki"],
            "level": [3, 1, 3],
            "score": [0.5, None, 2.0],
        }
    ).save_to_disk(str(path))
    base = {"kind": "dataset", "path": str(path), "text_column": "q", "answer_column": "a"}
    plain = load_prompts(DatasetSource(**base), lambda: None)
    assert [r.meta for r in plain] == [{}, {}, {}]
    named = load_prompts(DatasetSource(**base, meta_columns=["source", "level"]), lambda: None)
    assert [r.meta for r in named] == [
        {"source": "wiki", "level": "3"},
        {"source": "news", "level": "1"},
        {"source": "wiki", "level": "3"},
    ]
    every = load_prompts(DatasetSource(**base, meta_columns="all"), lambda: None)
    assert [r.meta.get("score") for r in every] == ["0.5", None, "2.0"]
    assert field_values(named, "level") == ["3", "1", "3"]
    with pytest.raises(PromptSourceError, match=r"has no column\(s\) \['colour'\]"):
        load_prompts(DatasetSource(**base, meta_columns=["colour"]), lambda: None)
    with pytest.raises(BreakdownFieldError, match="meta_columns"):
        field_values(plain, "source")


def test_sources_without_meta_columns_dump_and_hash_as_before():
    spec = JobSpec.model_validate(
        {
            "prompts": {"kind": "jsonl", "path": "p.jsonl"},
            "job": {"kind": "attribute", "nodes": ["z"]},
            "store": "s",
        }
    )
    assert spec.model_dump(mode="json")["prompts"] == {"kind": "jsonl", "path": "p.jsonl"}
    labelled = spec.model_copy(
        update={"prompts": JsonlSource(kind="jsonl", path="p.jsonl", meta_columns=["g"])}
    )
    assert labelled.content_hash() != spec.content_hash()
    source = DatasetSource(kind="dataset", path="d")
    assert "meta_columns" not in source.model_dump()
    assert PromptRecord(text="t", meta={"g": "1"}).meta == {"g": "1"}
