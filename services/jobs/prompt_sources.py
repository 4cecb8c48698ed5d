"""Materialise a job's prompt source into PromptRecords (on the driver)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from circuitscan.pipelines.tasks.template_filler import fill_templates
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.jobs import (
    DatasetSource,
    IOISource,
    JsonlSource,
    PromptSource,
    TemplateSource,
    TextFileSource,
)
from circuitscan.schemas.prompts import PromptRecord


class PromptSourceError(UserInputError):
    """A prompt source that cannot be read; the message names the file and line."""


def _existing(path: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise PromptSourceError(f"prompt source not found: {resolved}")
    return resolved


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptSourceError(f"{path}: not UTF-8 text: {exc}") from exc


def _from_text(source: TextFileSource) -> list[PromptRecord]:
    lines = _read_text(_existing(source.path)).splitlines()
    return [PromptRecord(text=line) for line in lines if line.strip()]


def _from_jsonl(source: JsonlSource) -> list[PromptRecord]:
    path = _existing(source.path)
    records: list[PromptRecord] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(PromptRecord.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise PromptSourceError(f"{path}:{number}: not a valid prompt record: {exc}") from exc
    return records


def _from_dataset(source: DatasetSource) -> list[PromptRecord]:
    import datasets

    path = _existing(source.path)
    loaded: Any = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if source.split is None:
            raise PromptSourceError(
                f"{path} holds splits {sorted(loaded)}; set prompts.split to one of them"
            )
        loaded = loaded[source.split]
    columns = set(loaded.column_names)
    wanted = [
        source.text_column,
        source.answer_column,
        source.wrong_column,
        source.corrupted_column,
    ]
    missing = [c for c in wanted if c is not None and c not in columns]
    if missing:
        raise PromptSourceError(f"{path} has no column(s) {missing}; columns are {sorted(columns)}")
    rows = loaded if source.limit is None else loaded.select(range(min(source.limit, len(loaded))))

    def column(row: dict[str, Any], name: str | None) -> str | None:
        return None if name is None else str(row[name])

    return [
        PromptRecord(
            text=str(row[source.text_column]),
            answer=column(row, source.answer_column),
            wrong=column(row, source.wrong_column),
            corrupted=column(row, source.corrupted_column),
        )
        for row in rows
    ]


def load_prompts(source: PromptSource, tokenizer: Callable[[], Any]) -> list[PromptRecord]:
    """All prompts of a source, in a stable order. ``tokenizer`` is called only if needed."""
    if isinstance(source, TextFileSource):
        return _from_text(source)
    if isinstance(source, JsonlSource):
        return _from_jsonl(source)
    if isinstance(source, DatasetSource):
        return _from_dataset(source)
    if isinstance(source, IOISource):
        from circuitscan.pipelines.tasks.ioi import generate_ioi

        return generate_ioi(tokenizer(), source.n, seed=source.seed, templates=source.templates)
    if isinstance(source, TemplateSource):
        return fill_templates(
            source.templates,
            source.fillers,
            n=source.n,
            seed=source.seed,
            answer=source.answer,
            wrong=source.wrong,
            corrupted=source.corrupted,
            distinct=source.distinct,
        )
    raise PromptSourceError(f"unknown prompt source {source!r}")
