"""Writing one shard's arrays under its own prefix, checksumming and reading them back.

Keys of shard ``s`` (six digits) all live under ``shards/<s>/`` so that no two
writers ever share a chunk or a file. They are encoded in memory and stored
as one pack object, ``shards/<s>/shard.pack`` (see shard_pack); shards written
before stores packed them hold each key as its own object. The members, by
key relative to the shard:

    prompts/token_ids        uint32 [tokens]        real tokens of every prompt, BOS first
    prompts/prompt_offsets   uint64 [prompts+1]     delta-encoded
    prompts/records          uint8  [bytes]         JSON list of PromptRecord
    sites/<label>/token_offsets  uint32 [tokens+1]  CSR offsets into the entry arrays
    sites/<label>/feature_ids    uint16|uint32 [entries]
    sites/<label>/activations    float16 (bfloat16 as uint16 bits) [entries]
    sites/<label>/gradients      same dtype [entries] (when the layout stores gradients)
    sites/<label>/error_norm     float32 [tokens]
    sites/<label>/dropped_mass   float32 [tokens] (when the layout keeps top-k)

What the merged index folds in of a site (its summaries, top candidates and
a·g sums, shard_summary) is computed here but not stored: it goes to the
driver with the entry (``ShardEntry.index_summaries``). Shards written while
it was stored hold ``sites/<label>/index_summary`` too; shards written before
index summaries hold ``sites/<label>/summary/{features,count,total,max,hist}``
and ``sites/<label>/top/{feature,prompt,position,value}`` (``read_summary``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import MemoryStore

from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ShardEntry, StoreLayout
from circuitscan.services.store import paired_io
from circuitscan.services.store.backends import Objects, read_prefix, write_many
from circuitscan.services.store.encoding import (
    TOKEN_CHUNK,
    ArrayWrite,
    encode_arrays,
    feature_id_dtype,
    open_array,
    read_arrays,
    values_back,
)
from circuitscan.services.store.errors import StoreError
from circuitscan.services.store.paired_io import ShardPairs, check_pairs
from circuitscan.services.store.shard_pack import checksum, pack_objects
from circuitscan.services.store.summaries import ShardSummary, summarize_shard

if TYPE_CHECKING:  # readers of a store never load torch: only writers hold tensors
    import torch

    from circuitscan.pipelines.site_cache import SiteCache


class ShardDataError(StoreError):
    """Shard data that does not match the store layout."""


def shard_prefix(shard_id: int) -> str:
    return f"shards/{shard_id:06d}/"


def encode_values(values: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations/gradients in the on-disk dtype (bfloat16 as its uint16 bits)."""
    import torch

    values = values.detach().to("cpu")
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.to(torch.float16).numpy()


def decode_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """On-disk values → float32."""
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: widening is a 16-bit shift, exact
        # for every value (NaN payloads included), with no torch on the read path.
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def object_checksums(store: Objects, prefix: str) -> dict[str, str]:
    """Checksums of every object stored under ``prefix``, keyed relative to it."""
    return {
        key.removeprefix(prefix): checksum(data) for key, data in read_prefix(store, prefix).items()
    }


def memory_store(objects: Mapping[str, bytes]) -> MemoryStore:
    """A read-only view of fetched objects that zarr can decode from (no further I/O)."""
    from zarr.core.buffer.cpu import Buffer

    return MemoryStore(store_dict={key: Buffer.from_bytes(data) for key, data in objects.items()})


def _validate(
    layout: StoreLayout,
    prompts: Sequence[PromptRecord],
    token_ids: Sequence[Sequence[int]],
    site_caches: Mapping[str, SiteCache],
) -> int:
    if len(prompts) != len(token_ids) or not prompts:
        raise ShardDataError(
            f"a shard needs ≥1 prompt and one token list per prompt; got {len(prompts)} prompts "
            f"and {len(token_ids)} token lists"
        )
    if len(prompts) > layout.shard_size:
        raise ShardDataError(f"{len(prompts)} prompts exceed the shard size {layout.shard_size}")
    expected = {site.label for site in layout.sites}
    if set(site_caches) != expected:
        raise ShardDataError(f"site caches {sorted(site_caches)} ≠ store sites {sorted(expected)}")
    n_tokens = sum(len(ids) for ids in token_ids)
    for site in layout.sites:
        cache = site_caches[site.label]
        if cache.n_tokens != n_tokens:
            raise ShardDataError(
                f"site {site.label} covers {cache.n_tokens} tokens but the prompts have {n_tokens}"
            )
        if cache.d_sae != site.d_sae:
            raise ShardDataError(f"site {site.label}: d_sae {cache.d_sae} ≠ layout {site.d_sae}")
        if layout.gradients and cache.gradients is None:
            raise ShardDataError(f"the store keeps gradients but site {site.label} has none")
    return n_tokens


def write_shard_arrays(
    store: Objects,
    layout: StoreLayout,
    shard_id: int,
    prompts: Sequence[PromptRecord],
    token_ids: Sequence[Sequence[int]],
    site_caches: Mapping[str, SiteCache],
    pairs: ShardPairs | None = None,
) -> ShardEntry:
    """Write one shard's data (not its manifest entry) and return the entry to commit.

    ``pairs``: a paired cache's named and paired positions (its layout has
    ``pairing``; each site cache then carries its corrupted side, see paired_io).

    The shard is encoded into memory, checksummed there, then uploaded in one
    concurrent batch of puts: a few requests per shard instead of several per
    array, which is what makes object storage usable.
    """
    n_tokens = _validate(layout, prompts, token_ids, site_caches)
    problem = check_pairs(layout, pairs, dict(site_caches), n_tokens)
    if problem:
        raise ShardDataError(problem)
    prefix = shard_prefix(shard_id)
    prompt_start = shard_id * layout.shard_size
    # Encoded into a staging dict first: the shard's objects are then checksummed
    # and uploaded together.
    staging: dict[str, Buffer] = {}
    backend, store = store, MemoryStore(store_dict=staging)
    zarr.create_group(store, path=prefix.rstrip("/"), overwrite=True)
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.uint64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
    offsets[1:] = np.cumsum(lengths)
    flat = np.fromiter((t for ids in token_ids for t in ids), dtype=np.uint32, count=n_tokens)
    records = json.dumps([p.model_dump(mode="json") for p in prompts]).encode()
    writes = [
        ArrayWrite(prefix + "prompts/token_ids", flat, chunk=TOKEN_CHUNK),
        ArrayWrite(prefix + "prompts/prompt_offsets", offsets, delta=True),
        ArrayWrite(prefix + "prompts/records", np.frombuffer(records, dtype=np.uint8)),
    ]
    from circuitscan.services.store import shard_summary  # imports this module

    stored_prompts = PromptShard(flat, offsets.astype(np.int64))
    token_prompt = prompt_start + np.repeat(np.arange(len(lengths)), lengths.astype(np.int64))
    token_position = np.arange(n_tokens) - np.repeat(
        offsets[:-1].astype(np.int64), lengths.astype(np.int64)
    )
    n_entries = {}
    summaries: dict[str, bytes] = {}
    for site in layout.sites:
        cache = site_caches[site.label]
        base = f"{prefix}sites/{site.label}/"
        feature_ids = cache.feature_ids.to("cpu").numpy().astype(feature_id_dtype(site.d_sae))
        token_index = cache.token_index.to("cpu").numpy()
        values = encode_values(cache.activations, layout.value_dtype)
        token_offsets = cache.token_offsets().numpy().astype(np.uint32)
        writes += [
            ArrayWrite(base + "token_offsets", token_offsets, delta=True),
            ArrayWrite(base + "feature_ids", feature_ids, delta=True),
            ArrayWrite(base + "activations", values),
            ArrayWrite(base + "error_norm", cache.error_norm.to("cpu").float().numpy()),
        ]
        if layout.gradients:
            assert cache.gradients is not None
            grads = encode_values(cache.gradients, layout.value_dtype)
            writes.append(ArrayWrite(base + "gradients", grads, shuffle="bitshuffle"))
        if layout.top_k_per_token is not None:
            dropped = cache.dropped_mass.to("cpu").float().numpy()
            writes.append(ArrayWrite(base + "dropped_mass", dropped))
        activations = decode_values(values, layout.value_dtype)
        summary = summarize_shard(
            feature_ids.astype(np.int64),
            activations,
            token_prompt,
            token_position,
            token_index,
            layout.examples_per_feature,
        )
        # What the merged index folds in, one object (the fold never reads the entries).
        stored = SiteShard(
            token_offsets.astype(np.int64),
            feature_ids,
            activations,
            decode_values(grads, layout.value_dtype) if layout.gradients else None,
            error_norm=np.zeros(0, dtype=np.float32),
            dropped_mass=None,
        )
        paired = None if pairs is None else shard_summary.paired_site(cache, layout, site.d_sae)
        summary_bytes = shard_summary.site_summary_bytes(
            layout, site.d_sae, summary, prompt_start, stored, stored_prompts, paired
        )
        # Not stored: it travels to the driver with the entry (ShardEntry.index_summaries).
        summaries[site.label] = summary_bytes
        n_entries[site.label] = int(feature_ids.shape[0])
        if pairs is not None:
            writes += paired_io.site_writes(base, cache, layout, site.d_sae)
    if pairs is not None:
        writes += paired_io.prompt_writes(prefix, pairs)
    encode_arrays(store, writes)
    # Parent groups outside the shard (the root, shards/) are not ours to write.
    members = {
        key.removeprefix(prefix): value.to_bytes()
        for key, value in staging.items()
        if key.startswith(prefix)
    }
    # One object for the whole shard (see shard_pack): one put, one file.
    data, pack = pack_objects(members)
    write_many(backend, {prefix + pack.key: data})
    entry = ShardEntry(
        shard_id=shard_id,
        layout_hash=layout.layout_hash(),
        prompt_start=prompt_start,
        n_prompts=len(prompts),
        n_tokens=n_tokens,
        n_entries=n_entries,
        checksums={key: checksum(raw) for key, raw in members.items()},
        pack=pack,
    )
    return entry.with_index_summaries(summaries or None)


_SUMMARY_ARRAYS = (
    "summary/features", "summary/count", "summary/total", "summary/max",
    "top/feature", "top/prompt", "top/position", "top/value",
)  # fmt: skip


def read_summary(store: Store, shard_id: int, label: str, prompt_start: int = 0) -> ShardSummary:
    """A shard's summaries; ``prompt_start`` (the shard's first prompt) makes prompts global."""
    base = f"{shard_prefix(shard_id)}sites/{label}/"
    # Shards written before stores kept histograms have no summary/hist.
    names = [
        *_SUMMARY_ARRAYS,
        *(["summary/hist"] if _has_array(store, base + "summary/hist") else []),
    ]
    arrays = read_arrays(store, [base + name for name in names])

    def load(name: str) -> np.ndarray:
        return arrays[base + name]

    return ShardSummary(
        features=load("summary/features").astype(np.uint32),
        count=load("summary/count").astype(np.uint32),
        total=load("summary/total").astype(np.float64),
        max=values_back(load("summary/max")),
        top_feature=load("top/feature").astype(np.uint32),
        top_prompt=(load("top/prompt").astype(np.int64) + prompt_start).astype(np.uint32),
        top_position=load("top/position").astype(np.uint32),
        top_value=values_back(load("top/value")),
        hist=load("summary/hist").astype(np.uint32) if "summary/hist" in names else None,
    )


def _has_array(store: Store, path: str) -> bool:
    from zarr.core.sync import sync

    return bool(sync(store.exists(f"{path}/zarr.json")))


@dataclass
class SiteShard:
    """One site of one shard, decoded: CSR entries plus per-token arrays (float32 values)."""

    token_offsets: np.ndarray
    feature_ids: np.ndarray
    activations: np.ndarray
    gradients: np.ndarray | None
    error_norm: np.ndarray
    dropped_mass: np.ndarray | None


@dataclass
class PromptShard:
    """The prompts of one shard: flat token ids and per-prompt offsets."""

    token_ids: np.ndarray
    prompt_offsets: np.ndarray


def read_prompts(store: Store, shard_id: int) -> PromptShard:
    prefix = shard_prefix(shard_id)
    return PromptShard(
        token_ids=open_array(store, prefix + "prompts/token_ids")[...],
        prompt_offsets=open_array(store, prefix + "prompts/prompt_offsets")[...].astype(np.int64),
    )


def read_records(store: Store, shard_id: int) -> list[PromptRecord]:
    raw = open_array(store, shard_prefix(shard_id) + "prompts/records")[...]
    return [PromptRecord.model_validate(item) for item in json.loads(raw.tobytes())]


def read_site(store: Store, layout: StoreLayout, shard_id: int, label: str) -> SiteShard:
    base = f"{shard_prefix(shard_id)}sites/{label}/"
    dtype = layout.value_dtype
    names = ["token_offsets", "feature_ids", "activations", "error_norm"]
    names += ["gradients"] if layout.gradients else []
    names += ["dropped_mass"] if layout.top_k_per_token is not None else []
    arrays = {
        path.removeprefix(base): data
        for path, data in read_arrays(store, [base + name for name in names]).items()
    }
    return SiteShard(
        token_offsets=arrays["token_offsets"].astype(np.int64),
        feature_ids=arrays["feature_ids"],
        activations=decode_values(arrays["activations"], dtype),
        gradients=decode_values(arrays["gradients"], dtype) if layout.gradients else None,
        error_norm=arrays["error_norm"],
        dropped_mass=arrays.get("dropped_mass"),
    )
