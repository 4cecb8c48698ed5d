"""The contract every feature-store backend passes, as a base class for its tests.

A backend's test module subclasses :class:`StoreContract` and supplies three
things: ``new_url`` (a class-scoped fixture returning a factory of fresh,
empty store URLs on that backend) and ``raw_read`` / ``raw_write``, which
reach the stored bytes *without* the backend, so that what a backend writes
and what damage looks like are checked against the medium itself::

    class TestLocalStore(StoreContract):
        @pytest.fixture(scope="class")
        def new_url(self, tmp_path_factory):
            return lambda: str(tmp_path_factory.mktemp("store") / "s")

        def raw_read(self, url, key):
            path = Path(url) / key
            return path.read_bytes() if path.is_file() else None

        def raw_write(self, url, key, data):
            (Path(url) / key).parent.mkdir(parents=True, exist_ok=True)
            (Path(url) / key).write_bytes(data)

The suite covers the backend interface (objects, listings, deletes,
versions, children) and the feature store on top of it (create/open,
commit protocol, reads equal to the caches, the merged index, corruption
found and repaired). Modelled on ``zarr.testing.store.StoreTests``.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest
import torch

from circuitscan.pipelines.caching import cache_batch
from circuitscan.pipelines.site_cache import SiteCache
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.store import (
    CorruptShardError,
    FeatureStore,
    QueryRangeError,
    ShardConflictError,
    SiteLayout,
    StoreLayout,
    StoreLayoutMismatchError,
    dense_slice,
    feature_summary,
    features_at,
    iter_shards,
    top_examples,
)
from circuitscan.services.store.backends import open_location
from circuitscan.services.store.shard_io import shard_prefix
from circuitscan.services.store.shard_pack import PACK_NAME
from circuitscan.services.store.summaries import histogram_edges
from circuitscan.testing.corruption import damage_member
from circuitscan.testing.tiny_models import build_tiny_model, build_tiny_sae
from circuitscan.testing.writer_contract import WriterContract

SITES = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]
SHARD_SIZE = 3
N_SHARDS = 3
D_SAE = 32

Shard = tuple[list[PromptRecord], list[list[int]], dict[str, SiteCache]]


def make_layout(**overrides: object) -> StoreLayout:
    """The contract's store layout (two sites of the tiny model), with fields overridden."""
    sites = [
        SiteLayout(label=s.label, hook_name=s.hook_name, d_sae=D_SAE, sae_fingerprint=f"sae{i}")
        for i, s in enumerate(SITES)
    ]
    fields: dict[str, object] = {
        "sites": sites,
        "shard_size": SHARD_SIZE,
        "examples_per_feature": 4,
        "model_fingerprint": "tiny",
        "job_hash": "job0",
    }
    return StoreLayout.model_validate(fields | overrides)


def make_shard(shard_id: int, top_k: int | None = None) -> Shard:
    """Deterministic prompts, token ids and caches of one shard (tiny float64 model)."""
    torch.manual_seed(0)
    model = build_tiny_model(seed=0)
    saes = [build_tiny_sae(model, site, d_sae=D_SAE, seed=i) for i, site in enumerate(SITES)]
    generator = torch.Generator().manual_seed(1000 + shard_id)
    n = SHARD_SIZE if shard_id < N_SHARDS - 1 else 2  # the last shard is short
    lengths = torch.randint(3, 9, (n,), generator=generator)
    tokens = torch.randint(1, 40, (n, int(lengths.max())), generator=generator)
    answer = torch.randint(0, 40, (n,), generator=generator)
    wrong = torch.randint(0, 40, (n,), generator=generator)
    caches = cache_batch(
        model, saes, tokens, lengths, MetricSpec(), answer=answer, wrong=wrong, top_k=top_k
    )
    prompts = [PromptRecord(text=f"shard {shard_id} prompt {i}", answer="a") for i in range(n)]
    token_ids = [tokens[i, : int(lengths[i])].tolist() for i in range(n)]
    return prompts, token_ids, caches


@functools.cache
def contract_shards() -> dict[int, Shard]:
    """Every shard of the contract's job (computed once per process, shared read-only)."""
    return {shard_id: make_shard(shard_id) for shard_id in range(N_SHARDS)}


def fill_store(
    url: str,
    shards: Mapping[int, Shard],
    order: Sequence[int] | None = None,
    layout: StoreLayout | None = None,
) -> FeatureStore:
    """Create a store at ``url`` and write and commit ``shards`` (in ``order``), then flush."""
    store = FeatureStore.create(url, layout or make_layout())
    for shard_id in order or sorted(shards):
        entry = FeatureStore.open(url).write_shard(shard_id, *shards[shard_id])
        store.commit_shard(entry)
    store.flush_index()
    return store


def _token_starts(token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    return np.cumsum([0] + [len(t) for t in token_ids])


class StoreContract(WriterContract, ABC):
    """Subclass once per backend; see the module docstring for what to supply.

    The writer side (conditional writes, the lease, replacing a store) is in
    :mod:`circuitscan.testing.writer_contract`.
    """

    @abstractmethod
    @pytest.fixture(scope="class")
    def new_url(self) -> Callable[[], str]:
        """A factory of fresh, empty store URLs on the backend under test."""

    @abstractmethod
    def raw_read(self, url: str, key: str) -> bytes | None:
        """The bytes stored under ``key`` of the store at ``url``, not using the backend."""

    @abstractmethod
    def raw_write(self, url: str, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` of the store at ``url``, not using the backend."""

    @pytest.fixture
    def store_url(self, new_url: Callable[[], str]) -> str:
        return new_url()

    @pytest.fixture(scope="class")
    def shards(self) -> dict[int, Shard]:
        return contract_shards()

    @pytest.fixture(scope="class")
    def filled_url(self, new_url: Callable[[], str], shards: dict[int, Shard]) -> str:
        """One store filled with every shard, committed out of order; read-only."""
        url = new_url()
        fill_store(url, shards, order=[2, 0, 1])
        return url

    # --- the backend interface ----------------------------------------------------------

    def test_objects_round_trip_through_the_medium(self, store_url: str) -> None:
        location = open_location(store_url)
        assert open_location(location.url).url == location.url
        objects = {"a/x": b"1", "a/b/y": b"\x00" * 1000, "c/z": b""}
        location.write_many(objects)
        for key, data in objects.items():
            assert self.raw_read(store_url, key) == data
            assert location.exists(key)
        self.raw_write(store_url, "a/w", b"written outside")
        assert location.read_many(["a/x", "a/w", "missing/k"]) == {
            "a/x": b"1",
            "a/w": b"written outside",
            "missing/k": None,
        }
        assert location.read_bytes("c/z") == b""
        assert location.list_keys("a/") == ["a/b/y", "a/w", "a/x"]
        assert location.list_keys("") == ["a/b/y", "a/w", "a/x", "c/z"]
        assert location.read_prefix("a/b/") == {"a/b/y": b"\x00" * 1000}
        assert not location.exists("missing/k")

    def test_deletes(self, store_url: str) -> None:
        location = open_location(store_url)
        location.write_many({"a/x": b"1", "a/y": b"2", "ab/z": b"3", "b/z": b"4"})
        location.delete_keys(["a/x", "missing/k"])  # a missing key is fine
        location.delete_keys([])
        assert self.raw_read(store_url, "a/x") is None
        location.delete_prefix("a/")  # a prefix is a folder: ab/ stays
        assert location.list_keys("") == ["ab/z", "b/z"]
        location.delete_prefix("")
        assert location.list_keys("") == []

    def test_version_marks_a_rewrite(self, store_url: str) -> None:
        location = open_location(store_url)
        assert location.version("zarr.json") is None
        location.write_bytes("zarr.json", b"{}")
        first = location.version("zarr.json")
        assert first is not None and location.version("zarr.json") == first
        time.sleep(0.05)  # past the coarsest file-time granularity
        location.write_bytes("zarr.json", b'{"v": 2}')
        assert location.version("zarr.json") not in (None, first)

    def test_children_are_stores_under_the_location(self, store_url: str) -> None:
        root = open_location(store_url)
        for name in ("one", "two"):
            root.child(name).write_bytes("zarr.json", name.encode())
        assert set(root.children()) >= {"one", "two"}
        child = open_location(root.child("one").url)
        assert child.read_bytes("zarr.json") == b"one"
        assert child.describe() and child.url != root.url

    # --- creating and opening ---------------------------------------------------------

    def test_create_reopens_equal_layout_and_refuses_a_different_one(self, store_url: str) -> None:
        store = FeatureStore.create(store_url, make_layout())
        assert FeatureStore.open(store_url).layout == store.layout
        assert FeatureStore.create(store_url, make_layout()).layout == store.layout
        with pytest.raises(StoreLayoutMismatchError, match=r"model_fingerprint.*overwrite"):
            FeatureStore.create(store_url, make_layout(model_fingerprint="other"))
        with pytest.raises(StoreLayoutMismatchError, match="job_hash"):
            FeatureStore.create(store_url, make_layout(job_hash="job1"))
        other_sae = make_layout().sites[0].model_copy(update={"sae_fingerprint": "retrained"})
        with pytest.raises(StoreLayoutMismatchError, match="sites"):
            FeatureStore.create(store_url, make_layout(sites=[other_sae, *make_layout().sites[1:]]))
        assert FeatureStore.open(store_url).layout == store.layout  # refusing changed nothing
        replaced = FeatureStore.create(store_url, make_layout(job_hash="job1"), overwrite=True)
        assert FeatureStore.open(store_url).layout.job_hash == "job1" == replaced.layout.job_hash

    def test_refuses_a_non_store_location_even_with_overwrite(self, store_url: str) -> None:
        self.raw_write(store_url, "something/else.txt", b"user data")
        with pytest.raises(StoreLayoutMismatchError, match="not empty"):
            FeatureStore.create(store_url, make_layout())
        # Replacing deletes only a store's own objects, and this is none.
        with pytest.raises(StoreLayoutMismatchError, match=r"not empty.*something/"):
            FeatureStore.create(store_url, make_layout(), overwrite=True)
        assert self.raw_read(store_url, "something/else.txt") == b"user data"

    # --- writing, committing, reading -------------------------------------------------

    def test_shard_invisible_until_committed_and_rewrite_is_a_noop(
        self, store_url: str, shards: dict[int, Shard]
    ) -> None:
        store = FeatureStore.create(store_url, make_layout())
        worker = FeatureStore.open(store_url)
        entry = worker.write_shard(0, *shards[0])
        assert store.committed_shard_ids() == set()
        assert store.uncommitted(range(N_SHARDS)) == [0, 1, 2]
        with pytest.raises(QueryRangeError, match="out of range"):
            features_at(store, SITES[0].label, 0, 0)
        assert store.commit_shard(entry) is True
        assert store.committed_shard_ids() == {0}
        keys = store.location.list_keys(shard_prefix(0))
        before = {key: self.raw_read(store_url, key) for key in keys}
        again = FeatureStore.open(store_url).write_shard(0, *shards[0])
        after = {key: self.raw_read(store_url, key) for key in keys}
        assert again == entry and before == after
        assert store.location.list_keys(shard_prefix(0)) == keys
        assert store.commit_shard(again) is False
        other = entry.model_copy(update={"checksums": {"x": "1:ab"}})
        with pytest.raises(ShardConflictError, match="already committed"):
            store.commit_shard(other)

    def test_stored_values_equal_the_caches(
        self, filled_url: str, shards: dict[int, Shard]
    ) -> None:
        reader = FeatureStore.open(filled_url)
        point = FeatureStore.open(filled_url)  # never decodes whole shards: chunk-level reads
        assert reader.committed_shard_ids() == {0, 1, 2}
        assert reader.n_prompts() == 2 * SHARD_SIZE + 2
        for shard_id, (_, token_ids, caches) in shards.items():
            starts = _token_starts(token_ids)
            for local, ids in enumerate(token_ids):
                prompt = shard_id * SHARD_SIZE + local
                assert reader.prompt_tokens(prompt).tolist() == ids
                for site in SITES:
                    cache = caches[site.label]
                    dense = cache.dense()[starts[local] : starts[local + 1]].float()
                    torch.testing.assert_close(
                        dense_slice(reader, site.label, prompt), dense, rtol=1e-3, atol=1e-3
                    )
                    position = len(ids) - 1
                    got = features_at(point, site.label, prompt, position, sort_by="activation")
                    assert got == features_at(
                        reader, site.label, prompt, position, sort_by="activation"
                    )
                    token = starts[local] + position
                    mask = cache.token_index == token
                    order = torch.argsort(-cache.activations[mask], stable=True)
                    assert got.feature_ids == cache.feature_ids[mask][order].tolist()
                    assert cache.gradients is not None
                    np.testing.assert_allclose(
                        got.gradients, cache.gradients[mask][order], rtol=1e-3, atol=1e-6
                    )
                    np.testing.assert_allclose(
                        got.attributions, np.array(got.activations) * np.array(got.gradients)
                    )
                    assert got.error_norm == pytest.approx(float(cache.error_norm[token]), rel=1e-6)
        tensors = list(iter_shards(reader, SITES[1].label))
        assert [t.shard_id for t in tensors] == [0, 1, 2]
        expected = shards[2][2][SITES[1].label].feature_ids.tolist()
        assert tensors[2].feature_ids.tolist() == expected

    def test_attribution_sort_is_by_absolute_attribution(
        self, filled_url: str, shards: dict[int, Shard]
    ) -> None:
        reader = FeatureStore.open(filled_url)
        got = features_at(reader, SITES[0].label, 0, len(shards[0][1][0]) - 1)
        magnitudes = np.abs(got.attributions)
        assert np.all(np.diff(magnitudes) <= 0) and magnitudes.max() > 0

    def test_summaries_and_top_examples_match_brute_force(
        self, filled_url: str, shards: dict[int, Shard]
    ) -> None:
        reader = FeatureStore.open(filled_url)  # committed in the order 2, 0, 1
        site = SITES[0].label
        records = []  # (feature, value, prompt, position) from the caches, float16 like the store
        for shard_id, (_, token_ids, caches) in shards.items():
            starts = _token_starts(token_ids)
            cache = caches[site]
            for token, feature, value in zip(
                cache.token_index.tolist(),
                cache.feature_ids.tolist(),
                cache.activations.tolist(),
                strict=True,
            ):
                local = int(np.searchsorted(starts, token, side="right") - 1)
                prompt = shard_id * SHARD_SIZE + local
                records.append((feature, float(np.float16(value)), prompt, token - starts[local]))
        for feature in range(D_SAE):
            hits = [r for r in records if r[0] == feature]
            summary = feature_summary(reader, site, feature)
            assert summary.count == len(hits)
            assert summary.total == pytest.approx(sum(h[1] for h in hits), rel=1e-6)
            expected = sorted(hits, key=lambda h: (-h[1], h[2], h[3]))[:4]
            got = top_examples(reader, site, feature, n=10, context=2)
            assert [(g.prompt, g.position) for g in got] == [(h[2], h[3]) for h in expected]
            assert [g.activation for g in got] == pytest.approx([h[1] for h in expected])
            for g in got:
                tokens = reader.prompt_tokens(g.prompt)
                assert g.context_token_ids[g.hit_index] == tokens[g.position]
            # The merged histogram counts every activation in the bin numpy puts it in.
            edges = histogram_edges()
            values = np.clip([h[1] for h in hits], edges[0], np.nextafter(edges[-1], 0))
            brute, _ = np.histogram(values, bins=edges)
            assert reader.feature_index(site).hist[feature].tolist() == brute.tolist()

    def test_query_bounds_are_named(self, filled_url: str) -> None:
        reader = FeatureStore.open(filled_url)
        with pytest.raises(QueryRangeError, match=f"d_sae is {D_SAE}"):
            top_examples(reader, SITES[0].label, D_SAE)
        with pytest.raises(QueryRangeError, match=r"prompts 0\.\.7"):
            features_at(reader, SITES[0].label, 8, 0)
        with pytest.raises(QueryRangeError, match=r"positions 0\.\."):
            features_at(reader, SITES[0].label, 0, 99)
        with pytest.raises(ValueError, match="unknown site"):
            feature_summary(reader, "L9.z", 0)

    def test_corrupt_shard_detected_on_read_and_recomputed_on_resume(
        self,
        store_url: str,
        filled_url: str,
        shards: dict[int, Shard],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        reference = FeatureStore.open(filled_url)  # an undamaged run of the same job
        fill_store(store_url, shards)
        # Shard 1: its pack cut short in an activation chunk (what follows is lost
        # too). Shard 2: a feature-id chunk with a bit flipped inside the pack
        # (same size, so only the checksum can tell).
        truncated = f"{shard_prefix(1)}{PACK_NAME}"
        altered = f"{shard_prefix(2)}{PACK_NAME}"
        for key, member, how in (
            (truncated, f"sites/{SITES[0].label}/activations/c/0", "truncate"),
            (altered, f"sites/{SITES[1].label}/feature_ids/c/0", "flip"),
        ):
            data = self.raw_read(store_url, key)
            assert data is not None
            self.raw_write(store_url, key, damage_member(data, member, how))
        reader = FeatureStore.open(store_url)
        with pytest.raises(CorruptShardError, match=r"shard 1 .*corrupt"):
            features_at(reader, SITES[0].label, SHARD_SIZE, 0)
        with pytest.raises(CorruptShardError, match=r"shard 2 .*corrupt.*feature_ids"):
            dense_slice(reader, SITES[1].label, 2 * SHARD_SIZE)
        features_at(reader, SITES[0].label, 0, 0)  # other shards stay readable
        with caplog.at_level("WARNING"):
            assert reader.uncommitted(range(N_SHARDS)) == [1, 2]
        assert reader.corrupt_shards == [1, 2]
        assert "shard 1 is corrupt" in caplog.text and "shard 2 is corrupt" in caplog.text
        assert reader.committed_shard_ids() == {0}
        assert reader.location.list_keys(shard_prefix(1)) == []  # the bad data is gone
        assert self.raw_read(store_url, truncated) is None
        for shard_id in (1, 2):
            entry = FeatureStore.open(store_url).write_shard(shard_id, *shards[shard_id])
            reader.commit_shard(entry)
        reader.flush_index()
        final = FeatureStore.open(store_url)
        assert final.uncommitted(range(N_SHARDS)) == []
        assert {i: e.digest() for i, e in final.committed_entries().items()} == {
            i: e.digest() for i, e in reference.committed_entries().items()
        }
        assert feature_summary(final, SITES[0].label, 3) == feature_summary(
            reference, SITES[0].label, 3
        )

    def test_bfloat16_and_top_k_layout(self, store_url: str) -> None:
        layout = make_layout(value_dtype="bfloat16", top_k_per_token=3)
        prompts, token_ids, caches = make_shard(0, top_k=3)
        store = FeatureStore.create(store_url, layout)
        store.commit_shard(store.write_shard(0, prompts, token_ids, caches))
        cache = caches[SITES[0].label]
        last = len(token_ids[0]) - 1
        got = features_at(store, SITES[0].label, 0, last, sort_by="activation")
        assert len(got.feature_ids) <= 3
        assert cache.dropped_mass is not None
        assert got.dropped_mass == pytest.approx(float(cache.dropped_mass[last]), rel=1e-6)
        torch.testing.assert_close(
            dense_slice(store, SITES[0].label, 0),
            cache.dense()[: last + 1].float(),
            rtol=1e-2,
            atol=1e-2,
        )
