"""Read job specs from YAML/JSON files with errors that list field paths."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.jobs import JobSpec


class SpecError(UserInputError):
    """An invalid job spec; the message lists every offending field path."""


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(root)"
        lines.append(f"  {path}: {error['msg']}")
    return "\n".join(lines)


def parse_spec(text: str, origin: str = "spec") -> JobSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{origin} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{origin} must be a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"invalid job spec {origin}:\n{format_validation_error(exc)}") from exc


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec file {path} is not UTF-8 text: {_bad_bytes(exc)}") from exc
    return parse_spec(text, origin=str(path))


def _bad_bytes(exc: UnicodeDecodeError) -> str:
    """Where the first byte that is not UTF-8 sits: line and byte offset, and the byte itself."""
    line = exc.object[: exc.start].count(b"\n") + 1
    return f"byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start} (line {line})"
