"""The feature store's errors, each on a branch of :mod:`circuitscan.schemas.errors`.

``StoreError`` is the store's user-error family (a ValueError, as it always
was): a store, prompt, feature or result that is not there, or a store that
holds something else. Damage is not a StoreError: it is a
``StoreCorruptionError`` (``CorruptShardError``, ``CorruptManifestError``,
``CorruptResultError``, ``CorruptIndexError``, ``CorruptLayoutError``, ``CorruptRecordError``), so code that falls back on "no such store" never
mistakes a damaged one for a missing one.

A module of its own with no heavy imports: every store module, the CLI and the
HTTP API use these names.
"""

from __future__ import annotations

from circuitscan.schemas.errors import (
    ConflictError,
    InfrastructureError,
    NotFoundError,
    StoreCorruptionError,
    UserInputError,
)


class StoreError(UserInputError):
    """Base class of the feature store's user errors (a request the store cannot answer)."""


class StoreNotFoundError(StoreError, NotFoundError):
    """No feature store at that URL."""


class StoreLayoutMismatchError(StoreError, ConflictError):
    """The store exists with a different layout, fingerprint or job hash."""


class ShardConflictError(StoreError, ConflictError):
    """A shard is committed with different content than the entry offered."""


class QueryRangeError(StoreError, NotFoundError):
    """A feature, prompt or position outside what the store holds."""


class ResultNotFoundError(StoreError, NotFoundError):
    """The store holds no (complete) job result of the kind asked for."""


class CorruptShardError(StoreCorruptionError):
    """A committed shard whose stored bytes do not match its manifest checksums."""


class CorruptManifestError(StoreCorruptionError):
    """A manifest entry (the record that commits a shard) that cannot be read back."""


class CorruptResultError(StoreCorruptionError):
    """A stored job result document that cannot be read back, or fails its checksum."""


class CorruptIndexError(StoreCorruptionError):
    """The merged feature index (its pointer or a generation's arrays) fails its checksums."""


class CorruptLayoutError(StoreCorruptionError):
    """The layout document (``zarr.json``) is unreadable or does not match the shards."""


class CorruptRecordError(StoreCorruptionError):
    """The job record (``job.json``: the layout's copy, the results written) is unreadable."""


class NotAStoreError(StoreLayoutMismatchError):
    """The location holds something that is not a feature store (it is never replaced).

    A layout mismatch as well, as "not empty and holds no store" always was.
    """


class StoreLeaseHeldError(StoreError, ConflictError):
    """Another job's driver holds the store's writer lease (one writer per store)."""


class StoreLeaseLostError(StoreError, ConflictError):
    """This driver's writer lease was taken over (it looked expired); it stops writing."""


class StoreAccessError(InfrastructureError):
    """The store's medium refused or failed an operation: a permission, missing
    credentials, an endpoint out of reach, a full disk. The message names the store,
    what was attempted and the medium's own reason; nothing was marked committed."""
