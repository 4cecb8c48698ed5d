"""Packed shards in a real store on disk: one object a shard, read like the loose objects.

A module-scoped store of the contract suite's tiny shards (3 shards, 2 sites),
copied for every test that changes it. An older store (shards as loose
objects, entries without a pack) is made from it by unpacking every shard:
every query answers the same from both.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from circuitscan.services.store import (
    CorruptShardError,
    FeatureStore,
    dense_slice,
    feature_summary,
    features_at,
    top_examples,
)
from circuitscan.services.store.encoding import open_array
from circuitscan.services.store.feature_page import feature_page
from circuitscan.services.store.integrity import verify_store
from circuitscan.services.store.manifest import entry_bytes, manifest_key
from circuitscan.services.store.shard_io import memory_store, shard_prefix
from circuitscan.services.store.shard_pack import PACK_NAME, unpack
from circuitscan.testing.corruption import damage, member_key
from circuitscan.testing.store_contract import (
    N_SHARDS,
    SHARD_SIZE,
    SITES,
    contract_shards,
    fill_store,
)

pytestmark = pytest.mark.integration

SITE = SITES[0].label


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packs") / "packed"
    fill_store(str(root), contract_shards())
    return root


def _copy(packed: Path, tmp_path: Path, name: str = "copy") -> Path:
    shutil.copytree(packed, tmp_path / name)
    return tmp_path / name


def _unpack_store(root: Path) -> None:
    """Rewrite a packed store as stores were before packs: loose objects, no pack in entries."""
    store = FeatureStore.open(str(root))
    for shard_id, entry in store.committed_entries().items():
        pack = root / shard_prefix(shard_id) / PACK_NAME
        for key, data in unpack(pack.read_bytes()).items():
            path = root / shard_prefix(shard_id) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        pack.unlink()
        old = entry.model_copy(update={"pack": None})
        (root / manifest_key(shard_id)).write_bytes(entry_bytes(old))


def _answers(url: str) -> dict[str, object]:
    """What the store answers to each kind of query (plain values, to compare)."""
    store = FeatureStore.open(url)
    last = (N_SHARDS - 1) * SHARD_SIZE + 1
    page = feature_page(store, SITE, 3).model_dump()
    page["notes"] = [note.replace(url, "STORE") for note in page["notes"]]  # notes name the store
    return {
        "features_at": [features_at(store, SITE, p, 1).model_dump() for p in (0, SHARD_SIZE, last)],
        "dense": [dense_slice(store, SITES[1].label, p).numpy().tolist() for p in (1, last)],
        "summaries": [feature_summary(store, SITE, f).model_dump() for f in range(0, 32, 5)],
        "top": [e.model_dump() for f in (1, 7) for e in top_examples(store, SITE, f, 3)],
        "page": page,
        "records": [r.model_dump() for s in range(N_SHARDS) for r in store.prompt_records(s)],
    }


def test_a_shard_is_one_pack_beside_its_entry(packed: Path) -> None:
    store = FeatureStore.open(str(packed))
    for shard_id in range(N_SHARDS):
        keys = store.location.list_keys(shard_prefix(shard_id))
        assert keys == [f"{shard_prefix(shard_id)}{PACK_NAME}"]
        assert len(keys) + 1 <= 8  # with its manifest entry: the target
        entry = store.manifest.entry(shard_id)
        assert entry.pack is not None and set(entry.pack.offsets) == set(entry.checksums)
    # One folder per shard and nothing below it.
    folders = [Path(d) for d, _, _ in os.walk(packed / "shards")]
    assert sorted(f.relative_to(packed).as_posix() for f in folders) == [
        "shards",
        *(shard_prefix(s).rstrip("/") for s in range(N_SHARDS)),
    ]


def test_every_packed_array_reads_as_its_unpacked_objects(packed: Path) -> None:
    store = FeatureStore.open(str(packed))
    for shard_id in range(N_SHARDS):
        prefix = shard_prefix(shard_id)
        members = unpack((packed / prefix / PACK_NAME).read_bytes())
        loose = memory_store({prefix + key: data for key, data in members.items()})
        arrays = [
            key.removesuffix("/zarr.json")
            for key, data in members.items()
            if key.endswith("/zarr.json") and json.loads(data)["node_type"] == "array"
        ]
        assert f"sites/{SITE}/activations" in arrays and len(arrays) >= 10
        for array in arrays:
            verified = store.manifest.read_verified(shard_id, [array + "/"])
            np.testing.assert_array_equal(
                open_array(verified, prefix + array)[...], open_array(loose, prefix + array)[...]
            )


def test_an_unpacked_store_answers_as_the_packed_one(packed: Path, tmp_path: Path) -> None:
    old = _copy(packed, tmp_path, "old")
    _unpack_store(old)
    assert FeatureStore.open(str(old)).manifest.entry(1).pack is None
    assert (old / shard_prefix(1) / f"sites/{SITE}/activations/zarr.json").is_file()
    assert _answers(str(old)) == _answers(str(packed))
    assert verify_store(str(old)).ok
    damage(old, f"{shard_prefix(1)}sites/{SITE}/feature_ids/c/0", "flip")
    (problem,) = verify_store(str(old)).problems
    assert problem.shard_id == 1 and "feature_ids" in problem.message


@pytest.mark.parametrize(
    ("where", "how", "named"),
    [
        ("header", "flip", "shard.pack (header)"),
        ("member", "flip", f"sites/{SITE}/activations/c/0"),
        ("member", "truncate", "bytes, the entry says"),
        ("member", "delete", "checksum mismatch"),  # every later member moved
    ],
)
def test_damaged_pack_bytes_are_found_naming_the_shard(
    packed: Path, tmp_path: Path, where: str, how: str, named: str
) -> None:
    copy = _copy(packed, tmp_path)
    if where == "header":
        pack = copy / shard_prefix(1) / PACK_NAME
        data = pack.read_bytes()
        pack.write_bytes(data[:12] + bytes([data[12] ^ 0x01]) + data[13:])
    else:
        damage(copy, member_key(1, f"sites/{SITE}/activations/c/0"), how)
    (problem,) = verify_store(str(copy)).problems
    assert problem.shard_id == 1 and named in problem.message, problem.message
    store = FeatureStore.open(str(copy))
    if where == "member":  # a reader meets it too; a damaged header is never read
        with pytest.raises(CorruptShardError, match=r"shard 1 .*corrupt"):
            features_at(store, SITE, SHARD_SIZE, 0)
    features_at(store, SITE, 0, 0)  # the other shards read as before


def test_deletes_leave_no_empty_folders(packed: Path, tmp_path: Path) -> None:
    copy = _copy(packed, tmp_path)
    store = FeatureStore.open(str(copy))
    before = sorted(p.name for p in (copy / "index").iterdir())
    store.uncommit(1)  # its entry, its pack and its folder
    store.flush_index()  # a new index generation; the old one is deleted
    assert not (copy / shard_prefix(1)).exists()
    assert sorted(p.name for p in (copy / "index").iterdir()) != before
    empty = [d for d, subdirs, files in os.walk(copy) if not subdirs and not files]
    assert empty == []
