"""Damaging a store's objects on purpose, the ways disks and people do (tests and bench).

Four ways: ``truncate`` (the first half kept), ``flip`` (one bit of the
middle byte), ``replace`` (with another valid object of the same kind) and
``delete``. :func:`object_cases` names, for each kind of object a store's
readers trust, one such object of a store, another valid object of its kind
and the words a report of its damage must contain. ``store_files`` reads a
local store back as {key: bytes} to compare a repaired store with an
undamaged one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DAMAGES = ("truncate", "flip", "replace", "delete")
KINDS = (
    "shard chunk",
    "shard metadata",
    "manifest entry",
    "index chunk",
    "index pointer",
    "result document",
    "layout document",
    "job record",
)
# The kinds ``circuitscan repair`` restores without the job's model (the index from
# the shards' summaries, the layout from the job record's copy and the record from
# the layout and the results).
REPAIRED_WITHOUT_MODEL = ("index chunk", "index pointer", "layout document", "job record")

# Objects a store holds only while a writer runs (its lease) are not content.
_TRANSIENT = ("lease.json",)


@dataclass(frozen=True)
class ObjectCase:
    """One object of a store to damage."""

    key: str  # the object, relative to the store
    other: bytes  # another valid object of the same kind (for ``replace``)
    names: tuple[str, ...]  # a report of its damage contains one of these


def damage(root: Path, key: str, how: str, other: bytes | None = None) -> None:
    """Damage object ``key`` of the local store at ``root`` in way ``how``."""
    path = root / key
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :])
    elif how == "replace":
        if other is None or other == data:
            raise ValueError(f"replacing {key} needs another object that differs from it")
        path.write_bytes(other)
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(f"unknown damage {how!r}; one of {DAMAGES}")


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of the local store at ``root`` by key (its writer lease left out)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in _TRANSIENT
    }


def _another(result: Any) -> Any:
    return result.model_copy(update={"n_prompts": result.n_prompts + 1})


def object_cases(root: Path, site: str, result_kind: str, scratch: Path) -> dict[str, ObjectCase]:
    """One object of each kind in the local store at ``root`` (3+ shards, a site, a result).

    ``scratch`` is an empty folder for the older copy of the store that gives
    another valid index pointer.
    """
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.index_writer import INDEX_POINTER
    from circuitscan.services.store.job_record import JobRecord
    from circuitscan.services.store.results import read_result, result_bytes
    from circuitscan.services.store.store_keys import LAYOUT_KEY, RECORD_KEY

    files = store_files(root)
    index = [key for key in files if key.startswith("index/") and key != INDEX_POINTER]
    chunk = next(key for key in index if f"/{site}/count/c/" in key)
    other_chunk = next(key for key in index if f"/{site}/max/c/" in key)
    older = scratch / "older"
    shutil.copytree(root, older)
    store = FeatureStore.open(str(older))
    store.uncommit(max(store.committed_shard_ids()))
    store.flush_index()
    opened = FeatureStore.open(str(root))
    other_job = FeatureStore(
        opened.url, opened.location, opened.layout.model_copy(update={"job_hash": "other-job"})
    )
    shard = f"shards/000001/sites/{site}"
    return {
        "shard chunk": ObjectCase(
            f"{shard}/activations/c/0",
            files[f"shards/000000/sites/{site}/activations/c/0"],
            ("shard 1",),
        ),
        "shard metadata": ObjectCase(
            f"{shard}/activations/zarr.json", files[f"{shard}/feature_ids/zarr.json"], ("shard 1",)
        ),
        "manifest entry": ObjectCase(
            "manifest/000001.json", files["manifest/000000.json"], ("manifest", "shard 1")
        ),
        "index chunk": ObjectCase(chunk, files[other_chunk], ("index",)),
        "index pointer": ObjectCase(
            INDEX_POINTER, (older / INDEX_POINTER).read_bytes(), ("index",)
        ),
        "result document": ObjectCase(
            f"results/{result_kind}.json",
            result_bytes(other_job, _another(read_result(opened, result_kind))),
            (f"results/{result_kind}.json",),
        ),
        "layout document": ObjectCase("zarr.json", files["shards/zarr.json"], ("zarr.json",)),
        # Another valid record: this store's, listing none of the results it holds.
        "job record": ObjectCase(
            RECORD_KEY, JobRecord(files[LAYOUT_KEY]).to_bytes(), (RECORD_KEY,)
        ),
    }
