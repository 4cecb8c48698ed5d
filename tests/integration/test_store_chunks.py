"""Chunk-level reads decode exactly what zarr decodes, across chunk boundaries and codecs."""

from __future__ import annotations

import numpy as np
import pytest

from circuitscan.services.store.chunk_reads import ArrayMeta, read_rows
from circuitscan.services.store.encoding import open_array, write_array
from circuitscan.services.store.shard_io import memory_store

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("dtype", "delta"),
    [("uint16", True), ("uint32", True), ("float16", False), ("float32", False)],
)
def test_read_rows_equals_zarr(dtype, delta):
    rng = np.random.default_rng(0)
    if delta:  # sorted runs restarting at random points, like feature ids per token
        data = np.concatenate([np.sort(rng.integers(0, 2000, size=n)) for n in (5, 40, 1, 60)])
    else:
        data = rng.normal(size=106) * (rng.random(106) > 0.3)
    data = data.astype(dtype)
    staged = memory_store({})
    write_array(staged, "a", data, delta=delta, chunk=16)
    objects = {key: value.to_bytes() for key, value in staged._store_dict.items()}
    meta = ArrayMeta.parse(objects["a/zarr.json"])
    assert meta.fast()
    fetched: list[str] = []

    def fetch(keys):
        fetched.extend(keys)
        return {key: objects[key] for key in keys if key in objects}

    whole = open_array(memory_store(objects), "a")[...]
    for start, stop in [(0, 0), (0, 106), (3, 9), (15, 17), (31, 64), (100, 106), (16, 32)]:
        fetched.clear()
        got = read_rows(fetch, "a", start, stop, meta)
        np.testing.assert_array_equal(got, whole[start:stop])
        assert got.dtype == data.dtype
        if stop > start:  # only the chunks holding the rows are read
            assert len(fetched) == (stop - 1) // 16 - start // 16 + 1
    with pytest.raises(IndexError, match="outside a"):
        read_rows(fetch, "a", 100, 107, meta)
