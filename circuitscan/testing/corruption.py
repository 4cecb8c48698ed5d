"""Damaging a store's objects on purpose, the ways disks and people do (tests and bench).

Four ways: ``truncate`` (the first half kept), ``flip`` (one bit of the
middle byte), ``replace`` (with another valid object of the same kind) and
``delete``; an object inside a shard's pack is addressed as
``shards/<s>/shard.pack#<member>`` (:func:`member_key`, :func:`damage_member`).
:func:`object_cases` names, for each kind of object a store's
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


def member_key(shard_id: int, member: str) -> str:
    """The address of one member of a packed shard, for :func:`damage`:
    ``shards/<s>/shard.pack#<member>`` (``member`` relative to the shard)."""
    from circuitscan.services.store.shard_io import shard_prefix
    from circuitscan.services.store.shard_pack import PACK_NAME

    return f"{shard_prefix(shard_id)}{PACK_NAME}#{member}"


def damage(root: Path, key: str, how: str, other: bytes | None = None) -> None:
    """Damage object ``key`` of the local store at ``root`` in way ``how``.

    ``key`` may address one member of a shard's pack (:func:`member_key`);
    see :func:`damage_member` for what each damage does to it.
    """
    key, _, member = key.partition("#")
    path = root / key
    data = path.read_bytes()
    if member:
        path.write_bytes(damage_member(data, member, how, other))
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        path.write_bytes(_flipped(data, len(data) // 2))
    elif how == "replace":
        if other is None or other == data:
            raise ValueError(f"replacing {key} needs another object that differs from it")
        path.write_bytes(other)
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(f"unknown damage {how!r}; one of {DAMAGES}")


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def damage_member(pack: bytes, member: str, how: str, other: bytes | None = None) -> bytes:
    """The shard pack ``pack`` with its member ``member`` damaged in way ``how``.

    What befalls one object inside a pack: ``truncate`` cuts the pack in the
    middle of the member (a write or copy cut short: what follows is lost
    too); ``flip`` flips one bit of the member's middle byte; ``replace`` and
    ``delete`` rebuild a well-formed pack (its own header consistent) with
    the member's bytes replaced by ``other`` or left out, so only the
    manifest entry can tell.
    """
    from circuitscan.services.store.shard_pack import pack_objects, pack_spans, unpack

    spans = pack_spans(pack)
    if member not in spans:
        raise ValueError(f"the pack has no member {member!r}")
    start, size = spans[member]
    members = unpack(pack)
    if how == "truncate":
        return pack[: start + size // 2]
    if how == "flip":
        return _flipped(pack, start + size // 2)
    if how == "replace":
        if other is None or other == members[member]:
            raise ValueError(f"replacing {member} needs another object that differs from it")
        members[member] = other
    elif how == "delete":
        del members[member]
    else:
        raise ValueError(f"unknown damage {how!r}; one of {DAMAGES}")
    return pack_objects(members)[0]


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
    from circuitscan.services.store.shard_pack import unpack
    from circuitscan.services.store.store_keys import LAYOUT_KEY, RECORD_KEY

    files = store_files(root)
    # The index's row chunks (index_chunks.py): one object a chunk of a site, by digest.
    index = sorted(key for key in files if key.startswith("index/") and key != INDEX_POINTER)
    chunk, other_chunk = index[0], index[-1]
    older = scratch / "older"
    shutil.copytree(root, older)
    store = FeatureStore.open(str(older))
    store.uncommit(max(store.committed_shard_ids()))
    store.flush_index()
    if other_chunk == chunk:  # a store with a single index chunk: the older store's differs
        older_index = {
            k: v
            for k, v in store_files(older).items()
            if k.startswith("index/") and k != INDEX_POINTER
        }
        other_bytes = next(v for k, v in sorted(older_index.items()) if v != files[chunk])
    else:
        other_bytes = files[other_chunk]
    opened = FeatureStore.open(str(root))
    other_job = FeatureStore(
        opened.url, opened.location, opened.layout.model_copy(update={"job_hash": "other-job"})
    )
    # Shards are packs (services/store/shard_pack): the cases damage one member
    # of shard 1's pack, another valid object being shard 0's (or another array's).
    first, second = (unpack(files[member_key(i, "").partition("#")[0]]) for i in (0, 1))
    chunk_member = f"sites/{site}/activations/c/0"
    return {
        "shard chunk": ObjectCase(member_key(1, chunk_member), first[chunk_member], ("shard 1",)),
        "shard metadata": ObjectCase(
            member_key(1, f"sites/{site}/activations/zarr.json"),
            second[f"sites/{site}/feature_ids/zarr.json"],
            ("shard 1",),
        ),
        "manifest entry": ObjectCase(
            "manifest/000001.json", files["manifest/000000.json"], ("manifest", "shard 1")
        ),
        "index chunk": ObjectCase(chunk, other_bytes, ("index",)),
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
