"""Folders the user names for output (``--out``): made up front, refused clearly.

A report, an export, an analysis or the demo writes into a folder the user
chose. One that cannot be made (a path under a file, a file of that name, a
read-only disk) is refused before any work runs, and a write that fails
later inside it (a full disk) is reported naming the path: neither ends in a
traceback, and neither removes anything already there.

Imports only the error root, so the CLI's fast commands can use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from circuitscan.schemas.errors import UserInputError


class OutputFolderError(UserInputError):
    """A folder named for output that cannot be made or written into."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def output_folder(path: Path, what: str) -> Path:
    """Make ``path`` (and its parents) to hold ``what``, or say why it cannot be."""
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"cannot write {what} to {path}: it is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"cannot write {what} to {path}: {_reason(exc)}") from exc
    return path


@contextmanager
def writing_into(path: Path, what: str) -> Iterator[Path]:
    """``output_folder(path, what)``, then a failed write inside it (named by the
    exception's path) is an OutputFolderError; other failures pass unchanged."""
    folder = output_folder(path, what).resolve()
    try:
        yield path
    except OSError as exc:
        failed = Path(exc.filename).resolve() if isinstance(exc.filename, str) else None
        if failed is None or not failed.is_relative_to(folder):
            raise
        raise OutputFolderError(f"cannot write {what} to {failed}: {_reason(exc)}") from exc
