"""One error root: every exception class circuitscan defines sits on one branch of CircuitscanError.

The module walk imports every module of the package, so a new error class that
forgets the root (or picks no branch) fails here, not in a user's terminal.
"""

from __future__ import annotations

import importlib
import inspect
import types
from pathlib import Path

import pytest

from circuitscan.schemas.errors import (
    BRANCHES,
    CircuitscanError,
    ConflictError,
    InfrastructureError,
    NotFoundError,
    StoreCorruptionError,
    UserInputError,
)

ROOT = Path(__file__).resolve().parents[2]
# Folder → import name (setup.py maps the layer folders into the package).
FOLDERS = {
    "circuitscan": "circuitscan",
    "schemas": "circuitscan.schemas",
    "pipelines": "circuitscan.pipelines",
    "services": "circuitscan.services",
}


def _module_names() -> list[str]:
    names = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((package, *parts)))
    return names


def _error_classes(module: types.ModuleType) -> list[type[BaseException]]:
    """Exception classes defined (not merely imported) in ``module``."""
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module.__name__
    ]


@pytest.fixture(scope="module")
def error_classes() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for name in _module_names():
        found += _error_classes(importlib.import_module(name))
    return found


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_every_error_class_descends_from_the_root(error_classes):
    # The walk must see the package's errors, or the check below passes vacuously.
    names = {cls.__name__ for cls in error_classes}
    assert {"CorruptShardError", "SpecError", "ShardFailed", "PositionError"} <= names
    assert len(error_classes) >= 30
    assert [_name(c) for c in error_classes if not issubclass(c, CircuitscanError)] == []


def test_every_error_class_is_on_exactly_one_branch(error_classes):
    from circuitscan.services.api.errors import ApiError

    exempt = {CircuitscanError, *BRANCHES, ApiError}  # ApiError carries its own status
    off_branch = [
        _name(cls)
        for cls in error_classes
        if cls not in exempt and sum(issubclass(cls, branch) for branch in BRANCHES) != 1
    ]
    assert off_branch == []


def test_branch_statuses(error_classes):
    for cls in error_classes:
        if issubclass(cls, UserInputError):
            assert 400 <= cls.http_status < 500 and cls.exit_code == 2, _name(cls)
            assert issubclass(cls, ValueError), _name(cls)
        elif issubclass(cls, StoreCorruptionError):
            # Damage is not bad input: code that catches ValueError must not swallow it.
            assert not issubclass(cls, ValueError), _name(cls)
            # A damaged store is a conflict with the stored state, not a server bug (500).
            assert cls.http_status == 409 and cls.exit_code == 3, _name(cls)
        elif issubclass(cls, InfrastructureError):
            assert cls.http_status == 503 and cls.exit_code != 0, _name(cls)
    assert NotFoundError.http_status == 404 and ConflictError.http_status == 409


def test_store_errors_take_the_status_of_their_kind():
    from circuitscan.services.store import (
        CorruptShardError,
        QueryRangeError,
        ResultNotFoundError,
        ShardConflictError,
        StoreError,
        StoreLayoutMismatchError,
        StoreNotFoundError,
    )

    assert [
        cls.http_status
        for cls in (
            StoreNotFoundError,
            QueryRangeError,
            ResultNotFoundError,
            StoreLayoutMismatchError,
            ShardConflictError,
        )
    ] == [404, 404, 404, 409, 409]
    assert issubclass(StoreNotFoundError, StoreError)
    assert not issubclass(CorruptShardError, StoreError | ValueError)


def test_api_error_keeps_its_own_status():
    from circuitscan.services.api.errors import ApiError

    assert ApiError(403, "no").http_status == 403 and ApiError(503, "down").status == 503


def test_the_walk_sees_a_class_without_the_root():
    # Guard against a collector that silently finds nothing.
    module = types.ModuleType("circuitscan.sample")
    exec(
        "class Stray(ValueError): pass\n"
        "from circuitscan.schemas.errors import UserInputError\n"
        "class Fine(UserInputError): pass\n",
        module.__dict__,
    )
    found = _error_classes(module)
    assert [cls.__name__ for cls in found] == ["Stray", "Fine"]
    assert [cls.__name__ for cls in found if not issubclass(cls, CircuitscanError)] == ["Stray"]
