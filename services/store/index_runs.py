"""Runs: the index summaries of a few just-committed shards, persisted as one object.

The merged index is tiered (index_writer.py). Its row chunks are rewritten
only every few flushes (a compaction), because a flush of a wide SAE would
otherwise rewrite nearly all of them (shards of random features touch every
chunk). A flush in between writes one run: the index summaries the workers
computed for the shards committed since the previous flush (each shard's
per-site ``encode_site_summary`` arrays, compressed here: they travel to the
driver uncompressed), so its cost is those shards' summaries, not the
index's size. The pointer (format 5) names the runs and their shards; a
reader folds them in at load, by the same functions (index_fold.py) as the
driver, to the same index. A compaction writes the chunks that changed and
drops the runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from circuitscan.services.store.backends import Backend
from circuitscan.services.store.errors import CorruptIndexError
from circuitscan.services.store.index_pointer import INDEX_POINTER, INDEX_PREFIX, pointer_runs
from circuitscan.services.store.packed_arrays import (
    FAST,
    PackedArraysError,
    pack_arrays,
    unpack_arrays,
)
from circuitscan.services.store.shard_pack import checksum

# A run's arrays: shard id → site label → the arrays of its encode_site_summary.
RunArrays = dict[int, dict[str, dict[str, np.ndarray]]]


def encode_run(summaries: dict[int, dict[str, bytes]]) -> bytes:
    """Shards' per-site index summaries (shard id → label → bytes) as one object."""
    arrays = {
        f"{shard_id}/{label}/{name}": data
        for shard_id in sorted(summaries)
        for label, raw in sorted(summaries[shard_id].items())
        for name, data in unpack_arrays(raw).items()
    }
    return pack_arrays(arrays, FAST)  # ~2× smaller than as sent, ~1 ms a shard


def decode_run(raw: bytes) -> RunArrays:
    """Inverse of ``encode_run``; PackedArraysError (or ValueError for a name that is not
    ``<shard>/<label>/<array>``) when it does not decode."""
    out: RunArrays = {}
    for name, data in unpack_arrays(raw).items():
        shard, *label, array = name.split("/")
        if not label or not shard.isdigit() or not array:
            raise ValueError(f"run array {name!r} is not named <shard>/<label>/<array>")
        out.setdefault(int(shard), {}).setdefault("/".join(label), {})[array] = data
    return out


def load_runs(
    location: Backend, pointer: dict[str, Any], shards: set[int], labels: set[str], url: str,
    fix: str,
) -> tuple[RunArrays, list[tuple[str, str, set[int]]]]:  # fmt: skip
    """The summaries in a format 5 pointer's runs, and its runs as (object, checksum,
    shards), each checked: named with a checksum, disjoint, within the pointer's
    ``shards``, matching its checksum, decoding, holding exactly its shards and ``labels``.

    CorruptIndexError names the pointer or the first run that fails.
    """
    runs = pointer_runs(pointer)
    sums = pointer["checksums"]
    in_runs: set[int] = set()
    for key, run_shards in runs:
        if key not in sums or not key.startswith(INDEX_PREFIX) or key == INDEX_POINTER:
            raise CorruptIndexError(f"index pointer {INDEX_POINTER} of {url} is unreadable; {fix}")
        if run_shards & in_runs or not run_shards <= shards:
            raise CorruptIndexError(
                f"index pointer {INDEX_POINTER} of {url} names runs that overlap or cover "
                f"shards it does not; {fix}"
            )
        in_runs |= run_shards
    data = location.read_many([key for key, _ in runs]) if runs else {}
    summaries: RunArrays = {}
    for key, run_shards in runs:
        raw = data[key]
        if raw is None or checksum(raw) != sums[key]:
            raise CorruptIndexError(f"index object {key} of {url} fails its checksum; {fix}")
        try:
            decoded = decode_run(raw)
        except (PackedArraysError, ValueError) as exc:
            raise CorruptIndexError(
                f"index object {key} of {url} does not decode ({exc}); {fix}"
            ) from exc
        if set(decoded) != run_shards or any(set(v) != labels for v in decoded.values()):
            raise CorruptIndexError(
                f"index object {key} of {url} holds other shards or sites than its pointer "
                f"names; {fix}"
            )
        summaries.update(decoded)
    return summaries, [(key, str(sums[key]), run_shards) for key, run_shards in runs]
