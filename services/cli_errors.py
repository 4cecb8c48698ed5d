"""How the CLI reports errors: ``error: <message>`` on stderr and the exit status of its branch.

Command bodies run inside :func:`reported_errors`. An error of circuitscan's
own (:mod:`circuitscan.schemas.errors`) prints its message and exits with its
branch's status: 2 for a user mistake (and, as always, for an unreachable
cluster or a failed shard), 3 for a damaged store, whose message names the
damaged object. Nothing lists error classes: a new class is reported right as
soon as it picks its branch. Anything else is a bug and keeps its traceback.

Imports only typer and the error root, so the CLI's fast store commands can
use it without loading torch or Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

from circuitscan.schemas.errors import CircuitscanError, UserInputError


def _say(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)


def fail(message: str, code: int = UserInputError.exit_code) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code`` (a user mistake's 2)."""
    _say(message)
    raise typer.Exit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn a CircuitscanError raised inside into its message and its branch's exit status."""
    try:
        yield
    except CircuitscanError as exc:
        _say(str(exc))
        raise typer.Exit(exc.exit_code) from exc
