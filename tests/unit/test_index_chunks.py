"""The merged index from the workers' index summaries, persisted as content-addressed row chunks.

Small real stores on local disk (synthetic shards with gradients, plain and
paired, no model): a worker's index summaries fold to the very index the
driver computes from the shards' arrays; a flush after a shard that touches
one chunk's features writes that chunk alone; the index is the same files in
any commit order; a damaged chunk is named and `rebuild` (what repair runs)
restores it byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitscan.pipelines.site_cache import CorruptEntries, SiteCache
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import PairingLayout, SiteLayout, StoreLayout
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.attribution_index import AttributionIndex
from circuitscan.services.store.errors import CorruptIndexError
from circuitscan.services.store.index_chunks import CHUNK_ROWS
from circuitscan.services.store.index_fold import fold_attributions, fold_summaries
from circuitscan.services.store.index_legacy import summaries_from_arrays
from circuitscan.services.store.index_writer import INDEX_POINTER
from circuitscan.services.store.paired_io import shard_pairs
from circuitscan.services.store.summaries import FeatureIndex
from circuitscan.testing.corruption import store_files

D_SAE = 3 * CHUNK_ROWS  # three chunks a site
PROMPTS, TOKENS, PER_TOKEN = 4, 5, 6
SITES = [
    SiteLayout(label="L1.resid_post", hook_name="blocks.1.hook_resid_post", d_sae=D_SAE),
    SiteLayout(label="L2.resid_post", hook_name="blocks.2.hook_resid_post", d_sae=D_SAE),
]


def _layout(paired: bool = False) -> StoreLayout:
    return StoreLayout(
        sites=SITES,
        gradients=True,
        shard_size=PROMPTS,
        examples_per_feature=3,
        pairing=PairingLayout(align="same") if paired else None,
        job_hash="index-chunks",
    )


def _shard(seed: int, chunk: int, paired: bool = False):  # type: ignore[no-untyped-def]
    """A shard whose features all lie in row chunk ``chunk`` (few ids: ties and full rows)."""
    rng = np.random.default_rng(seed)
    n_tokens = PROMPTS * TOKENS
    ids = chunk * CHUNK_ROWS + rng.choice(40, (n_tokens, PER_TOKEN)).astype(np.int64)
    ids = np.sort(ids, axis=1)
    keep = np.c_[np.ones((n_tokens, 1), bool), np.diff(ids, axis=1) > 0]  # distinct a token
    token = np.repeat(np.arange(n_tokens), PER_TOKEN)[keep.ravel()]
    flat = ids.ravel()[keep.ravel()]
    n = len(flat)

    def values(scale: float) -> torch.Tensor:  # a few values: ties broken by prompt, position
        return torch.from_numpy(rng.choice([0.5, 1.0, 2.0, 3.0], n).astype(np.float32) * scale)

    caches = {}
    for site in SITES:
        corrupt = None
        if paired:
            corrupt = CorruptEntries(
                token_index=torch.from_numpy(token),
                feature_ids=torch.from_numpy(flat),
                activations=values(1.0),
                gradients=values(-0.25),
                error_atp=torch.from_numpy(rng.normal(0, 1, n_tokens).astype(np.float32)),
            )
        caches[site.label] = SiteCache(
            token_index=torch.from_numpy(token),
            feature_ids=torch.from_numpy(flat),
            activations=values(1.0),
            gradients=values(0.125),
            error_norm=torch.zeros(n_tokens),
            dropped_mass=torch.zeros(n_tokens),
            n_tokens=n_tokens,
            d_sae=D_SAE,
            corrupt=corrupt,
        )
    records = [PromptRecord(text=f"p{seed}.{i}") for i in range(PROMPTS)]
    tokens = [list(range(TOKENS)) for _ in records]
    pairs = None
    if paired:
        pairs = shard_pairs(None, torch.arange(n_tokens, dtype=torch.int32), PROMPTS)
    return records, tokens, caches, pairs


def _written(path: Path, chunks: list[int], paired: bool = False) -> tuple[FeatureStore, list]:
    store = FeatureStore.create(str(path), _layout(paired))
    entries = [store.write_shard(i, *_shard(i, chunk, paired)) for i, chunk in enumerate(chunks)]
    return store, entries


@pytest.mark.parametrize("paired", [False, True])
def test_worker_summaries_fold_to_the_index_the_shards_arrays_give(tmp_path, paired):
    store, entries = _written(tmp_path / "s", [0, 1, 0, 2], paired)
    # The worker's summaries travel with the entry, not in the shard.
    assert all(
        entry.index_summaries is not None
        and set(entry.index_summaries) == {site.label for site in SITES}
        and not any(key.endswith("index_summary") for key in entry.checksums)
        for entry in entries
    )
    for entry in entries:
        store.commit_shard(entry)
    store.feature_index(SITES[0].label)
    assert not store.index._held  # every held summary was folded in
    reader = FeatureStore.open(store.url)  # holds none: folds the shards from their arrays
    for site in SITES:
        assert all(
            getattr(reader.feature_index(site.label), name).tobytes()
            == getattr(store.feature_index(site.label), name).tobytes()
            for name in FeatureIndex.__dataclass_fields__
        )
    k = store.layout.examples_per_feature
    from_arrays = {site.label: FeatureIndex.empty(D_SAE, k) for site in SITES}
    attribution = {site.label: AttributionIndex.empty(D_SAE, k, paired=paired) for site in SITES}
    for entry in entries:  # the driver-side computation, from the entries themselves
        for label, summary, terms in summaries_from_arrays(
            store.manifest, store.layout, entry.shard_id, True
        ):
            fold_summaries(from_arrays[label], [summary])
            assert terms is not None and (terms.atp_features is not None) == paired
            fold_attributions(attribution[label], [terms])
    for site in SITES:
        folded = store.feature_index(site.label)
        worker = store.index.attribution(site.label)
        for name in folded.__dataclass_fields__:
            assert (
                getattr(folded, name).tobytes() == getattr(from_arrays[site.label], name).tobytes()
            )
        for name in worker.__dataclass_fields__:
            left, right = getattr(worker, name), getattr(attribution[site.label], name)
            assert (left is None) == (right is None) and (
                left is None or left.tobytes() == right.tobytes()
            ), name
        assert (worker.top_prompt[:, -1] != -1).sum() > 20  # full rows: the filter acts


class _Counting:
    """Counts the objects a backend is asked to write and delete."""

    def __init__(self, location) -> None:  # type: ignore[no-untyped-def]
        self.location, self.written, self.deleted = location, [], []
        write_many, delete_keys = location.write_many, location.delete_keys
        location.write_many = lambda objects: (self.written.extend(objects), write_many(objects))
        location.delete_keys = lambda keys: (
            self.deleted.extend(keys := list(keys)),
            delete_keys(keys),
        )


def test_a_flush_writes_only_the_chunks_whose_rows_changed(tmp_path):
    store, entries = _written(tmp_path / "s", [0, 0, 1])
    driver = FeatureStore.open(store.url)
    driver.index_flush_every = 10**9
    for entry in entries[:2]:
        driver.commit_shard(entry, verify=False)
    driver.flush_index()
    before = {key for key in store_files(tmp_path / "s") if key.startswith("index/")}
    # The pointer, each site's chunk 0, and one empty chunk named by both sites' chunks 1, 2.
    assert len(before) == 1 + len(SITES) + 1
    counting = _Counting(driver.location)
    driver.commit_shard(entries[2], verify=False)  # features of chunk 1 only
    driver.flush_index()
    chunk_writes = [k for k in counting.written if k.startswith("index/") and k != INDEX_POINTER]
    assert len(chunk_writes) == len(SITES)  # chunk 1 of each site; the pointer on its own
    assert counting.deleted == []  # the old chunk 1 was the empty chunk, still named elsewhere
    after = {key for key in store_files(tmp_path / "s") if key.startswith("index/")}
    assert after == before | set(chunk_writes)
    # The same index as one built from scratch, and nothing else under index/.
    FeatureStore.open(store.url).index.rebuild()
    assert {k for k in store_files(tmp_path / "s") if k.startswith("index/")} == after


def test_the_index_is_the_same_files_in_any_commit_order_and_a_damaged_chunk_is_repaired(
    tmp_path,
):
    store, entries = _written(tmp_path / "a", [2, 0, 1, 0, 2])
    for entry in entries:
        store.commit_shard(entry)
    store.flush_index()
    pristine = store_files(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "manifest")
    shutil.rmtree(tmp_path / "b" / "index")
    other = FeatureStore.open(str(tmp_path / "b"))
    for entry in reversed(entries):
        assert other.commit_shard(entry)
    other.flush_index()
    assert store_files(tmp_path / "b") == pristine

    chunk = sorted(key for key in pristine if key.startswith("index/") and key != INDEX_POINTER)[1]
    data = bytearray(pristine[chunk])
    data[len(data) // 2] ^= 1
    (tmp_path / "b" / chunk).write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=chunk):
        FeatureStore.open(str(tmp_path / "b")).feature_index(SITES[0].label)
    (tmp_path / "b" / "index" / ("0" * 32)).write_bytes(b"left by a crash")
    FeatureStore.open(str(tmp_path / "b")).index.rebuild()
    assert store_files(tmp_path / "b") == pristine


def test_a_format_3_pointer_is_read_and_checked_and_replaced_by_the_current_format(tmp_path):
    import json

    from circuitscan.services.store.index_pointer import (
        POINTER_FORMAT,
        parse_pointer,
        pointer_bytes,
        pointer_shards,
        shards_digest,
    )

    store, entries = _written(tmp_path / "s", [0, 1, 2])
    for entry in entries:
        store.commit_shard(entry)
    store.flush_index()
    path = tmp_path / "s" / INDEX_POINTER
    pointer = parse_pointer(path.read_bytes(), store.url)
    assert pointer["format"] == POINTER_FORMAT and pointer["shard_ranges"] == [[0, 3]]
    assert pointer["runs"] == []  # a flush_index compacts
    expected = store.feature_index(SITES[0].label)
    # The same index as format 3 wrote it: every shard id and a digest of their entries.
    old = {k: v for k, v in pointer.items() if k not in ("shard_ranges", "shards_sum", "runs")}
    old |= {"format": 3, "shards": [0, 1, 2]}
    old["shards_digest"] = shards_digest(store.manifest, [0, 1, 2])
    path.write_bytes(pointer_bytes(old))
    reader = FeatureStore.open(store.url)
    assert reader.feature_index(SITES[0].label).top_value.tobytes() == expected.top_value.tobytes()
    assert reader.index.problems() == []
    reader.flush_index()  # the next flush writes the current format again
    assert json.loads(path.read_bytes())["format"] == POINTER_FORMAT
    # A shards_sum that does not match the committed entries is caught, as a digest was.
    altered = parse_pointer(path.read_bytes(), store.url)
    altered["shards_sum"] = "0" * 32
    path.write_bytes(pointer_bytes(altered))
    with pytest.raises(CorruptIndexError, match="other manifest entries"):
        FeatureStore.open(store.url).feature_index(SITES[0].label)
    assert pointer_shards({"shard_ranges": [[0, 2], [5, 7]]}) == {0, 1, 5, 6}


def test_held_summaries_stay_bounded_and_a_refused_commit_holds_none(tmp_path):
    from circuitscan.services.store.errors import ShardConflictError
    from circuitscan.services.store.index_writer import HELD_LIMIT

    store, entries = _written(tmp_path / "s", [0, 1, 2, 0, 1, 2] * 12)  # 72 shards
    driver = FeatureStore.open(store.url)
    driver.index.background = True  # as a job's driver: folds on a thread of their own
    driver.index_flush_every = 10**9
    most = 0
    for entry in entries:
        assert driver.commit_shard(entry, verify=False)
        most = max(most, len(driver.index._held))
    assert most <= HELD_LIMIT  # a commit waits for the fold rather than hold more
    driver.flush_index()
    assert not driver.index._held
    other = entries[0].model_copy(update={"checksums": {"x": "1:ab"}})
    other.with_index_summaries(entries[0].index_summaries)
    with pytest.raises(ShardConflictError):
        driver.commit_shard(other)
    assert not driver.index._held  # what a refused commit brought is not kept
    fresh = FeatureStore.open(store.url)  # folds every shard from its arrays
    for site in SITES:
        assert (
            fresh.feature_index(site.label).top_prompt.tobytes()
            == driver.feature_index(site.label).top_prompt.tobytes()
        )


def _same_index(left: FeatureStore, right: FeatureStore) -> bool:
    """Every array of every site's feature and attribution index, byte for byte."""
    for site in SITES:
        a, b = left.feature_index(site.label), right.feature_index(site.label)
        if any(getattr(a, n).tobytes() != getattr(b, n).tobytes() for n in a.__dataclass_fields__):
            return False
        x, y = left.index.attribution(site.label), right.index.attribution(site.label)
        for name in x.__dataclass_fields__:
            u, v = getattr(x, name), getattr(y, name)
            if (u is None) != (v is None) or (u is not None and u.tobytes() != v.tobytes()):
                return False
    return True


def _index_objects(path: Path) -> dict[str, bytes]:
    return {k: v for k, v in store_files(path).items() if k.startswith("index/")}


@pytest.mark.parametrize("paired", [False, True])
def test_flushes_between_compactions_write_runs_a_reader_folds_to_the_same_index(tmp_path, paired):
    from circuitscan.services.store.index_pointer import parse_pointer, pointer_runs

    chunks = [0, 1, 2, 0, 1, 2, 0]
    store, entries = _written(tmp_path / "s", chunks, paired)
    driver = FeatureStore.open(store.url)
    driver.index_flush_every = 2
    driver.index.compact_every = 6  # runs of 2 shards, then a compaction
    counting = _Counting(driver.location)
    path = tmp_path / "s" / INDEX_POINTER
    for entry in entries[:4]:
        assert driver.commit_shard(entry, verify=False)
    pointer = parse_pointer(path.read_bytes(), store.url)
    # Two flushes, two runs, over no chunks yet: a flush writes its run and the pointer.
    assert [shards for _, shards in pointer_runs(pointer)] == [{0, 1}, {2, 3}]
    assert all(site["chunks"] == [] for site in pointer["sites"].values())
    index_writes = [k for k in counting.written if k.startswith("index/") and k != INDEX_POINTER]
    assert index_writes == [pointer_runs(pointer)[0][0], pointer_runs(pointer)[1][0]]
    reader = FeatureStore.open(store.url)  # folds the runs in: the driver's index
    assert set(reader.committed_shard_ids()) == {0, 1, 2, 3} and reader.index.problems() == []
    assert _same_index(reader, driver)
    for entry in entries[4:6]:
        assert driver.commit_shard(entry, verify=False)
    # The third flush would make 6 shards in runs: it compacts, runs deleted.
    pointer = parse_pointer(path.read_bytes(), store.url)
    assert pointer["runs"] == [] and pointer["shard_ranges"] == [[0, 6]]
    assert not any(k in _index_objects(tmp_path / "s") for k in index_writes)
    assert driver.commit_shard(entries[6], verify=False)
    driver.index.flush_recent()  # a run over the chunks
    pointer = parse_pointer(path.read_bytes(), store.url)
    assert [shards for _, shards in pointer_runs(pointer)] == [{6}]
    assert _same_index(FeatureStore.open(store.url), driver)
    # A driver restarted here goes on from the runs; its last flush compacts to the files
    # one compaction of every shard, in another order, gives.
    restarted = FeatureStore.open(store.url)
    restarted.committed_shard_ids()
    restarted.index_flush_every = 2
    restarted.index.compact_every = 6
    restarted.flush_index()
    assert parse_pointer(path.read_bytes(), store.url)["runs"] == []
    other, others = _written(tmp_path / "o", chunks, paired)
    for entry in reversed(others):
        other.commit_shard(entry)
    other.flush_index()
    assert _index_objects(tmp_path / "s") == _index_objects(tmp_path / "o")


def test_a_damaged_run_is_named_verified_and_rebuilt(tmp_path):
    from circuitscan.services.store.index_pointer import parse_pointer, pointer_runs

    store, entries = _written(tmp_path / "s", [0, 1, 2, 0])
    driver = FeatureStore.open(store.url)
    driver.index_flush_every = 2
    driver.index.compact_every = 100
    for entry in entries:
        driver.commit_shard(entry, verify=False)
    run = pointer_runs(parse_pointer((tmp_path / "s" / INDEX_POINTER).read_bytes(), store.url))[1]
    data = bytearray((tmp_path / "s" / run[0]).read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "s" / run[0]).write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=run[0]):
        FeatureStore.open(store.url).feature_index(SITES[0].label)
    problems = FeatureStore.open(store.url).index.problems()
    assert problems and problems[0][0] == "index" and run[0] in problems[0][1]
    FeatureStore.open(store.url).index.rebuild()  # from the shards' arrays, runs dropped
    assert FeatureStore.open(store.url).index.problems() == []
    assert _same_index(FeatureStore.open(store.url), driver)
    assert run[0] not in _index_objects(tmp_path / "s")


def test_a_shard_committed_without_its_summaries_is_compacted_not_run(tmp_path):
    from circuitscan.services.store.index_pointer import parse_pointer

    store, entries = _written(tmp_path / "s", [0, 1, 2])
    driver = FeatureStore.open(store.url)
    driver.index_flush_every = 3
    driver.index.compact_every = 100
    # What a process that read the entry has: no summaries (they are never stored).
    bare = type(entries[1]).model_validate_json(entries[1].model_dump_json())
    assert bare.index_summaries is None
    for entry in (entries[0], bare, entries[2]):
        driver.commit_shard(entry, verify=False)
    pointer = parse_pointer((tmp_path / "s" / INDEX_POINTER).read_bytes(), store.url)
    assert pointer["runs"] == [] and pointer["shard_ranges"] == [[0, 3]]
    assert _same_index(FeatureStore.open(store.url), driver)


def test_a_background_driver_writes_runs_and_its_last_flush_compacts(tmp_path):
    from circuitscan.services.store.index_pointer import parse_pointer, pointer_runs

    store, entries = _written(tmp_path / "s", [0, 1, 2, 1] * 5)  # 20 shards
    driver = FeatureStore.open(store.url)
    driver.index.background = True  # as a job's driver: runs and folds on a thread
    driver.index_flush_every = 2
    driver.index.compact_every = 1000
    for start in range(0, len(entries), 2):
        for entry in entries[start : start + 2]:  # the second starts a run on a thread
            assert driver.commit_shard(entry, verify=False)
        flusher = driver.index._flusher
        assert flusher is not None
        flusher.join()
    pointer = parse_pointer((tmp_path / "s" / INDEX_POINTER).read_bytes(), store.url)
    runs = pointer_runs(pointer)
    assert [shards for _, shards in runs] == [{i, i + 1} for i in range(0, 20, 2)]
    assert all(site["chunks"] == [] for site in pointer["sites"].values())
    assert not driver.index._held and not driver.index._unpersisted  # folded, persisted
    reader = FeatureStore.open(store.url)
    assert reader.index.problems() == [] and _same_index(reader, driver)
    driver.flush_index()
    assert parse_pointer((tmp_path / "s" / INDEX_POINTER).read_bytes(), store.url)["runs"] == []
    assert _same_index(FeatureStore.open(store.url), driver)
    assert not driver.index._unpersisted and not driver.index._held


def test_a_reader_catching_up_reloads_the_newer_index_rather_than_read_the_shards(tmp_path):
    store, entries = _written(tmp_path / "s", [0, 1, 2, 0, 1, 2, 0])
    writer = FeatureStore.open(store.url)
    writer.index_flush_every = 2
    writer.index.compact_every = 4
    for entry in entries[:2]:
        writer.commit_shard(entry, verify=False)  # a run of shards 0, 1
    reader = FeatureStore.open(store.url)  # a long-lived reader (the HTTP API)
    assert _same_index(reader, writer)
    for entry in entries[2:7]:
        writer.commit_shard(entry, verify=False)  # a compaction at 4, a run at 6; 6 unflushed
    assert reader.catch_up()
    read: list[str] = []
    location = reader.location
    read_many, read_ranges = location.read_many, location.read_ranges
    location.read_many = lambda keys: read_many(read.extend(keys := list(keys)) or keys)
    location.read_ranges = lambda key, ranges: (read.append(key), read_ranges(key, ranges))[1]
    assert _same_index(reader, writer)
    # Shards 2-5 came with the writer's chunks and run; only shard 6 was read from its arrays.
    assert {key.split("/")[1] for key in read if key.startswith("shards/")} == {"000006"}
    assert any(key.startswith("index/") for key in read)


def test_a_chunk_written_before_exact_totals_reads_with_zero_residuals() -> None:
    """Index chunks of stores written before totals kept their residuals still decode:
    the totals as stored, their residuals zero (no format change, no rebuild needed)."""
    from circuitscan.services.store.index_chunks import decode_chunk, encode_chunk
    from circuitscan.services.store.packed_arrays import FAST, pack_arrays, unpack_arrays

    d_sae, k = 40, 3
    index, attribution = FeatureIndex.empty(d_sae, k), AttributionIndex.empty(d_sae, k, paired=True)
    attribution.add_totals("total", np.arange(d_sae), np.linspace(-1.0, 1.0, d_sae) / 3)
    attribution.add_totals("atp_total", np.arange(d_sae), np.linspace(0.0, 2.0, d_sae) / 7)
    stored = unpack_arrays(encode_chunk(index, attribution, 0))
    assert "attribution/total_residual" in stored
    older = pack_arrays({n: a for n, a in stored.items() if not n.endswith("_residual")}, FAST)
    read = AttributionIndex.empty(d_sae, k, paired=True)
    read.total_residual[:] = read.atp_total_residual[:] = 1.0  # type: ignore[index]
    decode_chunk(FeatureIndex.empty(d_sae, k), read, 0, older)
    assert np.array_equal(read.total, attribution.total)
    assert np.array_equal(read.atp_total, attribution.atp_total)  # type: ignore[arg-type]
    assert not read.total_residual.any() and not read.atp_total_residual.any()  # type: ignore[union-attr]
