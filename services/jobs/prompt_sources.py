"""A job's prompt source as a lazy, random-access prompt set: the records of any index range.

Nothing here holds a prompt set in memory. Files are indexed once (one
offset per prompt) and read by range; datasets are memory-mapped Arrow
tables sliced by range; generators (IOI, templates) replay their seeded
draws up to the range and build only its prompts. The driver plans shards
from counts and a worker builds its own shard's records from the spec and
the range, so the records it builds for ``[start, stop)`` are exactly
``load_prompts(source)[start:stop]``, the eager list.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

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
from circuitscan.services.jobs.planning import PromptSlice


class PromptSourceError(UserInputError):
    """A prompt source that cannot be read; the message names the file and line."""


def _existing(path: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise PromptSourceError(f"prompt source not found: {resolved}")
    return resolved


class PromptSet:
    """The prompts of a source by index: ``len()`` and ``records(start, stop)``.

    ``generated`` sets are a function of their spec (and the tokenizer): every
    prompt carries the same labels and named positions, so the driver checks a
    sample of them instead of building all of them.
    """

    generated = False

    def __len__(self) -> int:
        raise NotImplementedError

    def records(self, start: int, stop: int) -> list[PromptRecord]:
        """Prompts ``start`` to ``stop - 1`` (clipped to the set)."""
        raise NotImplementedError

    def longest_ascii(self) -> int | None:
        """An upper bound on a prompt's characters when every prompt is ASCII (None: unknown)."""
        return None

    def texts(self, start: int, stop: int) -> list[str]:
        """The clean texts of prompts ``start`` to ``stop - 1`` (what the token cap counts)."""
        return [record.text for record in self.records(start, stop)]

    def chunks(self, size: int = 8192) -> Iterator[tuple[int, list[PromptRecord]]]:
        """(first index, records) of consecutive ranges of ``size`` prompts."""
        for start in range(0, len(self), size):
            yield start, self.records(start, start + size)


class _LineFile(PromptSet):
    """A UTF-8 file whose prompts are lines, indexed by byte offset.

    The eager reader split ``read_text()`` with ``str.splitlines``; a physical
    line (ending in ``\\n``) can hold several of those lines (``\\r``, ``\\x1c``,
    ``\\u2028``...), so each prompt is (offset of its physical line, which of
    its pieces), and the 1-based logical line number is kept for messages.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        offsets: list[int] = []
        pieces: list[int] = []
        numbers: list[int] = []
        number = 0
        offset = 0
        with path.open("rb") as handle:
            for raw in handle:
                try:
                    lines = raw.decode("utf-8").splitlines()
                except UnicodeDecodeError as exc:
                    raise PromptSourceError(
                        f"{path}: not UTF-8 text: byte {offset + exc.start} ({exc.reason})"
                    ) from exc
                for piece, line in enumerate(lines):
                    number += 1
                    if line.strip():
                        offsets.append(offset)
                        pieces.append(piece)
                        numbers.append(number)
                offset += len(raw)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._pieces = np.asarray(pieces, dtype=np.int32)
        self._numbers = np.asarray(numbers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def _lines(self, start: int, stop: int) -> Iterator[tuple[int, str]]:
        stop = min(stop, len(self))
        with self.path.open("rb") as handle:
            for index in range(start, stop):
                handle.seek(int(self._offsets[index]))
                lines = handle.readline().decode("utf-8").splitlines()
                yield int(self._numbers[index]), lines[int(self._pieces[index])]


class TextPrompts(_LineFile):
    """A text file, one prompt a non-blank line."""

    def records(self, start: int, stop: int) -> list[PromptRecord]:
        return [PromptRecord(text=line) for _, line in self._lines(start, stop)]


_RECORD_FIELDS = frozenset(PromptRecord.model_fields)


def _label(value: Any, where: str, column: str) -> str | None:
    """A column's value as a meta label: scalars as strings, None as no label."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise PromptSourceError(
        f"{where}: column {column!r} holds a {type(value).__name__}; only strings, numbers "
        "and booleans can be kept as labels"
    )


def _one_line(exc: ValidationError) -> str:
    """A record's first validation problem in one line (pydantic's text spans several)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


class JsonlPrompts(_LineFile):
    """A JSONL file, one PromptRecord a non-blank line (``meta_columns`` keys kept as meta)."""

    def __init__(self, path: Path, meta_columns: list[str] | str | None = None) -> None:
        super().__init__(path)
        self.meta_columns = meta_columns or []

    def _row(self, row: Any, where: str) -> dict[str, Any]:
        if not isinstance(row, dict) or not self.meta_columns:
            return row  # type: ignore[no-any-return]
        keep = [
            key
            for key in row
            if key not in _RECORD_FIELDS
            and (self.meta_columns == "all" or key in self.meta_columns)
        ]
        if not keep:
            return row
        meta = dict(row.get("meta") or {})
        for key in keep:
            value = _label(row[key], where, key)
            if key in meta and value is not None and meta[key] != value:
                raise PromptSourceError(
                    f"{where}: {key!r} is both a column ({value!r}) and a meta key ({meta[key]!r})"
                )
            if value is not None:
                meta[key] = value
        kept = {key: value for key, value in row.items() if key not in keep}
        return {**kept, "meta": meta}

    def records(self, start: int, stop: int) -> list[PromptRecord]:
        records = []
        for number, line in self._lines(start, stop):
            where = f"{self.path}:{number}"
            try:
                records.append(PromptRecord.model_validate(self._row(json.loads(line), where)))
            except json.JSONDecodeError as exc:
                raise PromptSourceError(f"{where}: not valid JSON: {exc}") from exc
            except ValidationError as exc:
                hint = ""
                if any(e["type"] == "extra_forbidden" for e in exc.errors()):
                    hint = "; keep further keys as labels with prompts.meta_columns"
                raise PromptSourceError(
                    f"{where}: not a valid prompt record: {_one_line(exc)}{hint}"
                ) from exc
        return records


class DatasetPrompts(PromptSet):
    """A ``save_to_disk`` dataset (memory-mapped: only the rows asked for are read)."""

    def __init__(self, source: DatasetSource) -> None:
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
        if source.meta_columns == "all":
            extra = [c for c in loaded.column_names if c not in wanted]
        else:
            extra = list(source.meta_columns)
        missing = [c for c in [*wanted, *extra] if c is not None and c not in columns]
        if missing:
            raise PromptSourceError(
                f"{path} has no column(s) {missing}; columns are {sorted(columns)}"
            )
        self.meta_columns = extra
        self.source = source
        self.table = loaded
        self._len = len(loaded) if source.limit is None else min(source.limit, len(loaded))

    def __len__(self) -> int:
        return self._len

    def records(self, start: int, stop: int) -> list[PromptRecord]:
        stop = min(stop, len(self))
        if start >= stop:
            return []
        source = self.source
        names = {
            "text": source.text_column,
            "answer": source.answer_column,
            "wrong": source.wrong_column,
            "corrupted": source.corrupted_column,
        }
        rows = self.table[start:stop]  # column name → values of those rows
        columns = {
            field: [None] * (stop - start) if name is None else [str(v) for v in rows[name]]
            for field, name in names.items()
        }
        labels = {name: rows[name] for name in self.meta_columns}
        records = []
        for i in range(stop - start):
            meta = {}
            for name, values in labels.items():
                value = _label(values[i], f"{self.source.path} row {start + i}", name)
                if value is not None:
                    meta[name] = value
            fields = {field: values[i] for field, values in columns.items()}
            records.append(PromptRecord(**fields, meta=meta))
        return records


class GeneratedPrompts(PromptSet):
    """IOI or template prompts: ``n`` of a seeded sequence, built range by range."""

    generated = True

    def __init__(self, n: int, generator: Any) -> None:
        self._len = n
        self.generator = generator  # an IOIGenerator or TemplateFiller

    def __len__(self) -> int:
        return self._len

    def records(self, start: int, stop: int) -> list[PromptRecord]:
        result: list[PromptRecord] = self.generator.records(start, min(stop, len(self)))
        return result

    def longest_ascii(self) -> int | None:
        """An upper bound on a prompt's characters when every prompt is ASCII, else None."""
        bound: int | None = self.generator.longest_ascii()
        return bound

    def texts(self, start: int, stop: int) -> list[str]:
        if hasattr(self.generator, "texts"):  # IOI: its texts without its tokenizer checks
            result: list[str] = self.generator.texts(start, min(stop, len(self)))
            return result
        return super().texts(start, stop)


def slice_records(prompts: PromptSet, part: PromptSlice) -> list[PromptRecord]:
    """The records of ``part`` (a worker's shard, or a verification pass's prompts)."""
    records: list[PromptRecord] = []
    for start, stop in part.ranges:
        records += prompts.records(start, stop)
    return records


def open_prompts(source: PromptSource, tokenizer: Callable[[], Any]) -> PromptSet:
    """The prompt set of a source (files indexed, nothing built). ``tokenizer`` only if needed."""
    if isinstance(source, TextFileSource):
        return TextPrompts(_existing(source.path))
    if isinstance(source, JsonlSource):
        return JsonlPrompts(_existing(source.path), source.meta_columns)
    if isinstance(source, DatasetSource):
        return DatasetPrompts(source)
    if isinstance(source, IOISource):
        from circuitscan.pipelines.tasks.ioi import IOIGenerator

        return GeneratedPrompts(
            source.n, IOIGenerator(tokenizer(), seed=source.seed, templates=source.templates)
        )
    if isinstance(source, TemplateSource):
        from circuitscan.pipelines.tasks.template_filler import TemplateFiller

        filler = TemplateFiller(
            source.templates,
            source.fillers,
            seed=source.seed,
            answer=source.answer,
            wrong=source.wrong,
            corrupted=source.corrupted,
            distinct=source.distinct,
        )
        return GeneratedPrompts(source.n, filler)
    raise PromptSourceError(f"unknown prompt source {source!r}")


def load_prompts(source: PromptSource, tokenizer: Callable[[], Any]) -> list[PromptRecord]:
    """All prompts of a source, in a stable order (the eager list; jobs read ranges instead)."""
    prompts = open_prompts(source, tokenizer)
    return prompts.records(0, len(prompts))
