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


class _DictCache:
    def __init__(self) -> None:
        self.chunks: dict[str, np.ndarray] = {}

    def get(self, key: str) -> np.ndarray | None:
        return self.chunks.get(key)

    def put(self, key: str, chunk: np.ndarray) -> None:
        self.chunks[key] = chunk


def test_cached_chunks_are_decoded_once_and_read_only():
    data = np.concatenate(
        [np.sort(np.random.default_rng(1).integers(0, 900, 9)) for _ in range(11)]
    )
    data = data.astype("uint16")  # 99 rows: 6 full chunks of 16 and a short last one
    staged = memory_store({})
    write_array(staged, "a", data, delta=True, chunk=16)
    objects = {key: value.to_bytes() for key, value in staged._store_dict.items()}
    meta = ArrayMeta.parse(objects["a/zarr.json"])
    fetched: list[str] = []

    def fetch(keys):
        fetched.extend(keys)
        return {key: objects[key] for key in keys if key in objects}

    cache = _DictCache()
    for start, stop in [(3, 40), (10, 20), (0, 99), (90, 99), (35, 36)]:
        got = read_rows(fetch, "a", start, stop, meta, cache)
        np.testing.assert_array_equal(got, data[start:stop])
    # Each chunk was fetched and decoded once, however many reads touched it.
    assert sorted(fetched) == sorted(f"a/c/{i}" for i in range(7))
    assert len(cache.chunks["a/c/6"]) == 99 - 6 * 16  # the last chunk keeps only real rows
    hit = read_rows(fetch, "a", 17, 18, meta, cache)
    with pytest.raises(ValueError, match="read-only"):
        hit[0] = 1
    np.testing.assert_array_equal(read_rows(fetch, "a", 0, 99, meta, cache), data)
