"""The feature store: SAE activations and metric gradients in a sharded Zarr v3 group.

URLs: a local path (default), ``memory://NAME`` (tests; shared per process),
``s3://BUCKET/PREFIX`` (endpoint from ``CIRCUITSCAN_S3_ENDPOINT`` or
``AWS_ENDPOINT_URL``).

Writing a job (driver D, workers W; W may be other processes or nodes)::

    layout = StoreLayout(sites=[SiteLayout(label=..., hook_name=..., d_sae=..., sae_fingerprint=...)],
                         value_dtype="float16", gradients=True, top_k_per_token=None,
                         examples_per_feature=32, shard_size=64,
                         model_fingerprint=..., job_hash=spec.content_hash(), job_spec=...)
    store = FeatureStore.create(url, layout, overwrite=False)      # D; reopens an equal layout
    todo = store.uncommitted(range(n_shards))                       # D; resume (verifies checksums,
                                                                    #    store.corrupt_shards lists bad ones;
                                                                    #    verify=False: entries only)
    # W, first: store.committed_entry(shard_id) is not None -> already done (one read)
    # W, for each shard id in todo (prompts = the shard's PromptRecords, in order):
    batch = tokenize_prompts(model, prompts)                        # pipelines.batching
    caches = cache_batch(model, saes, batch.tokens, batch.lengths, metric,
                         answer=batch.answer, wrong=batch.wrong, top_k=layout.top_k_per_token,
                         gradients=layout.gradients)                # pipelines.caching
    entry = FeatureStore.open(url).write_shard(shard_id, prompts, batch.token_lists(), caches)
    # (several batches per shard: concatenate with merge_site_caches(list_of_caches))
    store.commit_shard(entry)                                       # D; ShardEntry is JSON-able
    store.flush_index()                                             # D; at the end of the job

Shard ``s`` owns prompts ``[s*shard_size, (s+1)*shard_size)`` (the last may be
short). ``write_shard`` on a committed shard is a no-op returning the committed
entry; ``commit_shard`` of an already committed equal entry returns False.

Reading (``circuitscan.services.store.queries``; the two tensor views from
``tensor_reads``, imported on first use so that reading a store needs no torch)::

    store = FeatureStore.open(url)
    features_at(store, "L6.z", prompt, position, sort_by="attribution", limit=None) -> ActiveFeatures
    top_examples(store, "L6.z", feature, n=20, context=8, decode=None) -> list[FeatureExample]
    feature_summary(store, "L6.z", feature) -> FeatureSummary
    dense_slice(store, "L6.z", prompt, positions=None, features=None, gradients=False) -> Tensor
    iter_shards(store, "L6.z", device="cpu") -> Iterator[ShardTensors]

Errors (``circuitscan.services.store.errors``): StoreError and its kinds
(StoreNotFoundError, StoreLayoutMismatchError, ShardConflictError,
QueryRangeError, ResultNotFoundError, ShardDataError, StoreURLError) are user
errors and ValueErrors; CorruptShardError, CorruptManifestError and
CorruptResultError are store corruption and deliberately not ValueErrors.
"""

from typing import TYPE_CHECKING, Any

from circuitscan.schemas.store import (
    ActiveFeatures,
    FeatureExample,
    FeatureSummary,
    ShardEntry,
    SiteLayout,
    StoreLayout,
)
from circuitscan.services.store.backends import StoreURLError, drop_memory_store
from circuitscan.services.store.errors import (
    CorruptManifestError,
    CorruptResultError,
    CorruptShardError,
    QueryRangeError,
    ResultNotFoundError,
    ShardConflictError,
    StoreError,
    StoreLayoutMismatchError,
    StoreNotFoundError,
)
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.queries import (
    feature_summary,
    features_at,
    top_examples,
)
from circuitscan.services.store.shard_io import ShardDataError

if TYPE_CHECKING:
    from circuitscan.services.store.tensor_reads import ShardTensors, dense_slice, iter_shards

_TENSOR_READS = frozenset({"ShardTensors", "dense_slice", "iter_shards"})


def __getattr__(name: str) -> Any:
    # torch loads only when a caller asks for a tensor view of the store.
    if name in _TENSOR_READS:
        from circuitscan.services.store import tensor_reads

        return getattr(tensor_reads, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ActiveFeatures",
    "CorruptManifestError",
    "CorruptResultError",
    "CorruptShardError",
    "FeatureExample",
    "FeatureStore",
    "FeatureSummary",
    "QueryRangeError",
    "ResultNotFoundError",
    "ShardConflictError",
    "ShardDataError",
    "ShardEntry",
    "ShardTensors",
    "SiteLayout",
    "StoreError",
    "StoreLayout",
    "StoreLayoutMismatchError",
    "StoreNotFoundError",
    "StoreURLError",
    "dense_slice",
    "drop_memory_store",
    "feature_summary",
    "features_at",
    "iter_shards",
    "top_examples",
]
