"""Batched array encoding writes what zarr itself writes, and the hierarchy opens as groups."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.storage import MemoryStore

from circuitscan.services.store.encoding import (
    ArrayWrite,
    _blosc,
    _delta_filters,
    encode_arrays,
    open_array,
    read_arrays,
    write_array,
)

RNG = np.random.default_rng(0)
ITEMS = [
    ArrayWrite("s/ids", np.sort(RNG.integers(0, 3000, 5000)).astype(np.uint16), delta=True),
    ArrayWrite("s/acts", RNG.normal(size=5000).astype(np.float16)),
    ArrayWrite("s/grads", RNG.normal(size=5000).astype(np.float16), shuffle="bitshuffle"),
    ArrayWrite("s/norm", RNG.normal(size=70).astype(np.float32)),
    ArrayWrite("s/many", RNG.integers(0, 9, 200_000).astype(np.uint32), chunk=1 << 16),
    ArrayWrite("s/rows", RNG.normal(size=(300, 4)).astype(np.float32), chunk=(256, 4)),
    ArrayWrite("s/deep/empty", np.zeros(0, dtype=np.uint8)),
]


def _zarr_reference(item: ArrayWrite) -> dict[str, bytes]:
    """The same array written by zarr.create_array + setitem."""
    store = MemoryStore()
    data = item.data
    chunks = item.chunk if isinstance(item.chunk, tuple) else (item.chunk,) * data.ndim
    chunks = tuple(max(1, min(c, n)) for c, n in zip(chunks, data.shape, strict=True))
    array = zarr.create_array(
        store,
        name=item.path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        filters=_delta_filters(data, item.delta),
        compressors=[_blosc(data.dtype, item.shuffle)],
        fill_value=0,
    )
    if data.size:
        array[...] = data
    prefix = item.path + "/"
    return {k: v.to_bytes() for k, v in store._store_dict.items() if k.startswith(prefix)}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_encode_arrays_writes_what_zarr_writes():
    store = MemoryStore()
    encode_arrays(store, ITEMS)
    objects = {k: v.to_bytes() for k, v in store._store_dict.items()}
    for item in ITEMS:
        expected = _zarr_reference(item)
        got = {k: v for k, v in objects.items() if k.startswith(item.path + "/")}
        assert got == expected, item.path
        np.testing.assert_array_equal(open_array(store, item.path)[...], item.data)
    decoded = read_arrays(store, [item.path for item in ITEMS])
    for item in ITEMS:
        np.testing.assert_array_equal(decoded[item.path], item.data)
    group = zarr.open_group(store, path="s", mode="r")  # the root is the store's to write
    assert set(group.array_keys()) >= {"ids", "acts", "rows"}
    assert group["deep"]["empty"].shape == (0,)


def test_write_array_replaces_an_array_in_a_directory(tmp_path):
    from zarr.storage import LocalStore

    store = LocalStore(tmp_path)
    write_array(store, "x/a", np.arange(200_000, dtype=np.uint32), chunk=1 << 16)
    assert len(list((tmp_path / "x/a/c").iterdir())) == 4
    write_array(store, "x/a", np.arange(10, dtype=np.uint32))  # shorter: old chunks go
    assert sorted(p.name for p in (tmp_path / "x/a/c").iterdir()) == ["0"]
    np.testing.assert_array_equal(open_array(store, "x/a")[...], np.arange(10))
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary files left behind
