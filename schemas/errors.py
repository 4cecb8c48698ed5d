"""The root of every error circuitscan raises on purpose, and the branches callers act on.

::

    CircuitscanError
    ├── UserInputError        the request is wrong and the message says how (also a ValueError)
    │   ├── NotFoundError     it names something that is not there (a store, a result, a prompt)
    │   └── ConflictError     it clashes with what is already there (a store of another job)
    ├── StoreCorruptionError  stored bytes are damaged; the message names the object (409)
    └── InfrastructureError   the machinery failed: a cluster out of reach, a shard that failed

Every class carries the HTTP status and the CLI exit status of its branch, so
the HTTP API and the CLI each read two attributes instead of listing classes:
a new error class is handled correctly as soon as it picks its branch.

User errors are ValueErrors as well because callers and tests have long caught
bad input as ValueError; corruption is deliberately not one, so that code which
catches bad input never swallows a damaged store.

Plain Python only (no pydantic, no torch): every layer and the CLI's fast path
import it.
"""

from __future__ import annotations


class CircuitscanError(Exception):
    """Base of every error circuitscan raises on purpose; a bare one is a bug."""

    http_status: int = 500
    exit_code: int = 1


class UserInputError(CircuitscanError, ValueError):
    """Input that cannot be used as given: a spec, prompts, positions, a query, a store name."""

    http_status = 400
    exit_code = 2


class NotFoundError(UserInputError):
    """The input names something that does not exist (store, site, result, prompt, feature)."""

    http_status = 404


class ConflictError(UserInputError):
    """The input is valid but clashes with what is already stored (another job, other content)."""

    http_status = 409


class StoreCorruptionError(CircuitscanError):
    """A store object whose bytes do not match what was committed, or that cannot be parsed.

    Not a ValueError: the input was fine, the store is damaged. Resuming the job
    recomputes damaged shards; the message names the object.

    HTTP 409 Conflict, not a 5xx: the server works and the request is valid,
    but the stored resource is in a state it cannot be answered from (RFC 9110:
    a conflict with the current state of the target resource, which the user
    can resolve, here with ``circuitscan repair``, and retry). A 500 stays what
    it says, a bug in the server.
    """

    http_status = 409
    exit_code = 3


class InfrastructureError(CircuitscanError):
    """The machinery failed, not the request: an unreachable cluster, a shard that failed."""

    http_status = 503
    # 2, as these errors always exited with, for scripts that already test it.
    exit_code = 2


BRANCHES: tuple[type[CircuitscanError], ...] = (
    UserInputError,
    StoreCorruptionError,
    InfrastructureError,
)
"""The three branches; every concrete error class descends from exactly one."""
