"""The shard pack format: members back out as packed, and every damaged byte is found."""

from __future__ import annotations

import pytest

from circuitscan.services.store.shard_pack import (
    MAGIC,
    PackError,
    checksum,
    coalesce,
    pack_mismatches,
    pack_objects,
    pack_spans,
    unpack,
)

MEMBERS = {
    "zarr.json": b'{"zarr_format":3,"node_type":"group"}',
    "prompts/token_ids/c/0": bytes(range(256)) * 3,
    "prompts/token_ids/zarr.json": b'{"shape":[768]}',
    "sites/L0.z/activations/c/0": b"\x01\x02" * 500,
    "sites/L0.z/empty": b"",
}
CHECKSUMS = {key: checksum(data) for key, data in MEMBERS.items()}


def test_members_round_trip_by_header_and_by_entry_offsets():
    data, pack = pack_objects(MEMBERS)
    assert data.startswith(MAGIC) and pack.size == len(data)
    assert unpack(data) == MEMBERS
    assert set(pack.offsets) == set(MEMBERS)
    for key, offset in pack.offsets.items():
        assert data[offset : offset + len(MEMBERS[key])] == MEMBERS[key]
        assert pack_spans(data)[key] == (offset, len(MEMBERS[key]))
    assert pack_mismatches(pack, CHECKSUMS, data) == []
    # Deterministic whatever the members' order: a recomputed shard is byte-identical.
    assert pack_objects(dict(reversed(list(MEMBERS.items())))) == (data, pack)


def test_every_damaged_byte_is_found():
    data, pack = pack_objects(MEMBERS)
    for at in range(len(data)):
        flipped = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
        assert pack_mismatches(pack, CHECKSUMS, flipped), at
    for size in range(len(data)):
        assert pack_mismatches(pack, CHECKSUMS, data[:size]), size
    assert pack_mismatches(pack, CHECKSUMS, data + b"\x00") == [
        f"shard.pack ({len(data) + 1} bytes, the entry says {len(data)})"
    ]
    assert "shard.pack" in pack_mismatches(pack, CHECKSUMS, None)


def test_a_flipped_member_byte_names_the_member():
    data, pack = pack_objects(MEMBERS)
    at = pack.offsets["sites/L0.z/activations/c/0"] + 10
    flipped = data[:at] + bytes([data[at] ^ 0x80]) + data[at + 1 :]
    assert pack_mismatches(pack, CHECKSUMS, flipped) == ["sites/L0.z/activations/c/0"]
    header_byte = len(MAGIC) + 6
    flipped = data[:header_byte] + b"#" + data[header_byte + 1 :]
    assert pack_mismatches(pack, CHECKSUMS, flipped) == ["shard.pack (header)"]


def test_not_a_pack_is_a_clear_error():
    with pytest.raises(PackError, match="not a shard pack"):
        unpack(b"garbage")
    data, _ = pack_objects(MEMBERS)
    with pytest.raises(PackError, match="header is unreadable"):
        unpack(data[:20])


def test_ranges_coalesce_when_close():
    assert coalesce([(10, 20), (0, 5), (20, 30)], gap=0) == [(0, 5), (10, 30)]
    assert coalesce([(10, 20), (0, 5), (20, 30)], gap=5) == [(0, 30)]
    assert coalesce([(0, 100), (10, 20)], gap=0) == [(0, 100)]
    assert coalesce([], gap=0) == []
