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

import numpy as np

from circuitscan.services.store.packed_arrays import FAST, pack_arrays, unpack_arrays

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
