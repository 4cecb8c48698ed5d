"""One contract suite for every feature-store backend: memory, local directory, S3 (moto server)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from s3_server import moto_s3

from circuitscan.pipelines.caching import SiteCache, cache_batch
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
    drop_memory_store,
    feature_summary,
    features_at,
    iter_shards,
    top_examples,
)
from circuitscan.services.store.backends import list_keys, read_bytes, write_bytes
from circuitscan.services.store.shard_io import shard_prefix
from circuitscan.testing import build_tiny_model, build_tiny_sae

pytestmark = pytest.mark.integration

SITES = [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]
SHARD_SIZE = 3
N_SHARDS = 3
D_SAE = 32


def make_layout(**overrides) -> StoreLayout:
    sites = [
        SiteLayout(label=s.label, hook_name=s.hook_name, d_sae=D_SAE, sae_fingerprint=f"sae{i}")
        for i, s in enumerate(SITES)
    ]
    fields = {
        "sites": sites,
        "shard_size": SHARD_SIZE,
        "examples_per_feature": 4,
        "model_fingerprint": "tiny",
        "job_hash": "job0",
    }
    return StoreLayout(**(fields | overrides))


def make_shard(shard_id: int, top_k: int | None = None):
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


@pytest.fixture(scope="module")
def shards():
    return {shard_id: make_shard(shard_id) for shard_id in range(N_SHARDS)}


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module", params=["memory", "local", "s3"])
def new_url(request, tmp_path_factory):
    """Factory of fresh store URLs on one backend (the S3 server starts once per module)."""
    made: list[str] = []
    if request.param == "s3":
        request.getfixturevalue("s3_endpoint")

    def make() -> str:
        name = uuid.uuid4().hex[:8]
        if request.param == "memory":
            url = f"memory://{name}"
        elif request.param == "local":
            url = str(tmp_path_factory.mktemp("store") / name)
        else:
            url = f"s3://circuitscan/{name}"
        made.append(url)
        return url

    yield make
    for url in made:
        if url.startswith("memory://"):
            drop_memory_store(url)


@pytest.fixture
def store_url(new_url):
    return new_url()


@pytest.fixture(scope="module")
def filled_url(new_url, shards):
    """One store per backend filled with every shard, committed out of order; read-only."""
    url = new_url()
    _fill(url, shards, order=[2, 0, 1])
    return url


def _fill(url: str, shards, order=None, layout=None) -> FeatureStore:
    store = FeatureStore.create(url, layout or make_layout())
    for shard_id in order or sorted(shards):
        entry = FeatureStore.open(url).write_shard(shard_id, *shards[shard_id])
        store.commit_shard(entry)
    store.flush_index()
    return store


def _token_ranges(token_ids):
    starts = np.cumsum([0] + [len(t) for t in token_ids])
    return starts


# --- creating and opening -----------------------------------------------------------


def test_create_reopens_equal_layout_and_refuses_a_different_one(store_url):
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


def test_refuses_a_non_store_location_unless_overwrite(store_url):
    from circuitscan.services.store.backends import open_backend

    write_bytes(open_backend(store_url), "something/else.txt", b"user data")
    with pytest.raises(StoreLayoutMismatchError, match="not empty"):
        FeatureStore.create(store_url, make_layout())
    FeatureStore.create(store_url, make_layout(), overwrite=True)


# --- writing, committing, reading -------------------------------------------------------


def test_shard_invisible_until_committed_and_rewrite_is_a_noop(store_url, shards):
    store = FeatureStore.create(store_url, make_layout())
    worker = FeatureStore.open(store_url)
    entry = worker.write_shard(0, *shards[0])
    assert store.committed_shard_ids() == set()
    assert store.uncommitted(range(N_SHARDS)) == [0, 1, 2]
    with pytest.raises(QueryRangeError, match="out of range"):
        features_at(store, SITES[0].label, 0, 0)
    assert store.commit_shard(entry) is True
    assert store.committed_shard_ids() == {0}
    before = {k: read_bytes(store.backend, k) for k in list_keys(store.backend, shard_prefix(0))}
    again = FeatureStore.open(store_url).write_shard(0, *shards[0])
    after = {k: read_bytes(store.backend, k) for k in list_keys(store.backend, shard_prefix(0))}
    assert again == entry and before == after
    assert store.commit_shard(again) is False
    other = entry.model_copy(update={"checksums": {"x": "1:ab"}})
    with pytest.raises(ShardConflictError, match="already committed"):
        store.commit_shard(other)


def test_stored_values_equal_the_caches(filled_url, shards):
    reader = FeatureStore.open(filled_url)
    point = FeatureStore.open(filled_url)  # never decodes whole shards: chunk-level reads
    assert reader.committed_shard_ids() == {0, 1, 2}
    assert reader.n_prompts() == 2 * SHARD_SIZE + 2
    for shard_id, (_, token_ids, caches) in shards.items():
        starts = _token_ranges(token_ids)
        for local, ids in enumerate(token_ids):
            prompt = shard_id * SHARD_SIZE + local
            assert reader.prompt_tokens(prompt).tolist() == ids
            for site in SITES:
                cache: SiteCache = caches[site.label]
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
                np.testing.assert_allclose(
                    got.gradients, cache.gradients[mask][order], rtol=1e-3, atol=1e-6
                )
                np.testing.assert_allclose(
                    got.attributions, np.array(got.activations) * np.array(got.gradients)
                )
                assert got.error_norm == pytest.approx(float(cache.error_norm[token]), rel=1e-6)
    tensors = list(iter_shards(reader, SITES[1].label))
    assert [t.shard_id for t in tensors] == [0, 1, 2]
    assert tensors[2].feature_ids.tolist() == shards[2][2][SITES[1].label].feature_ids.tolist()


def test_attribution_sort_is_by_absolute_attribution(filled_url, shards):
    reader = FeatureStore.open(filled_url)
    got = features_at(reader, SITES[0].label, 0, len(shards[0][1][0]) - 1)
    magnitudes = np.abs(got.attributions)
    assert np.all(np.diff(magnitudes) <= 0) and magnitudes.max() > 0


def test_summaries_and_top_examples_match_brute_force(filled_url, shards):
    reader = FeatureStore.open(filled_url)  # committed in the order 2, 0, 1
    site = SITES[0].label
    records = []  # (feature, value, prompt, position) from the caches, in float16 like the store
    for shard_id, (_, token_ids, caches) in shards.items():
        starts = _token_ranges(token_ids)
        cache = caches[site]
        for token, feature, value in zip(
            cache.token_index.tolist(),
            cache.feature_ids.tolist(),
            cache.activations.tolist(),
            strict=True,
        ):
            local = int(np.searchsorted(starts, token, side="right") - 1)
            records.append(
                (
                    feature,
                    float(np.float16(value)),
                    shard_id * SHARD_SIZE + local,
                    token - starts[local],
                )
            )
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
            assert g.context_token_ids[g.hit_index] == reader.prompt_tokens(g.prompt)[g.position]


def test_query_bounds_are_named(filled_url, shards):
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
    store_url, filled_url, shards, caplog
):
    reference = FeatureStore.open(filled_url)  # an undamaged run of the same job
    store = _fill(store_url, shards)
    # Shard 1: an activation chunk truncated. Shard 2: a feature-id chunk with
    # its bytes altered in place (same size, so only the checksum can tell).
    truncated = f"{shard_prefix(1)}sites/{SITES[0].label}/activations/c/0"
    altered = f"{shard_prefix(2)}sites/{SITES[1].label}/feature_ids/c/0"
    data = read_bytes(store.backend, truncated)
    assert data is not None
    write_bytes(store.backend, truncated, data[: len(data) // 2])
    data = read_bytes(store.backend, altered)
    assert data is not None
    write_bytes(store.backend, altered, data[:-1] + bytes([data[-1] ^ 0xFF]))
    reader = FeatureStore.open(store_url)
    with pytest.raises(CorruptShardError, match=r"shard 1 .*corrupt.*activations"):
        features_at(reader, SITES[0].label, SHARD_SIZE, 0)
    with pytest.raises(CorruptShardError, match=r"shard 2 .*corrupt.*feature_ids"):
        dense_slice(reader, SITES[1].label, 2 * SHARD_SIZE)
    features_at(reader, SITES[0].label, 0, 0)  # other shards stay readable
    with caplog.at_level("WARNING"):
        assert reader.uncommitted(range(N_SHARDS)) == [1, 2]
    assert reader.corrupt_shards == [1, 2]
    assert "shard 1 is corrupt" in caplog.text and "shard 2 is corrupt" in caplog.text
    assert reader.committed_shard_ids() == {0}
    assert list_keys(reader.backend, shard_prefix(1)) == []  # the bad data is gone
    for shard_id in (1, 2):
        reader.commit_shard(FeatureStore.open(store_url).write_shard(shard_id, *shards[shard_id]))
    reader.flush_index()
    final = FeatureStore.open(store_url)
    assert final.uncommitted(range(N_SHARDS)) == []
    assert {i: e.digest() for i, e in final.committed_entries().items()} == {
        i: e.digest() for i, e in reference.committed_entries().items()
    }
    assert feature_summary(final, SITES[0].label, 3) == feature_summary(
        reference, SITES[0].label, 3
    )


def test_bfloat16_and_top_k_layout(store_url):
    layout = make_layout(value_dtype="bfloat16", top_k_per_token=3)
    prompts, token_ids, caches = make_shard(0, top_k=3)
    store = FeatureStore.create(store_url, layout)
    store.commit_shard(store.write_shard(0, prompts, token_ids, caches))
    cache = caches[SITES[0].label]
    last = len(token_ids[0]) - 1
    got = features_at(store, SITES[0].label, 0, last, sort_by="activation")
    assert len(got.feature_ids) <= 3
    assert got.dropped_mass == pytest.approx(float(cache.dropped_mass[last]), rel=1e-6)
    torch.testing.assert_close(
        dense_slice(store, SITES[0].label, 0),
        cache.dense()[: last + 1].float(),
        rtol=1e-2,
        atol=1e-2,
    )
