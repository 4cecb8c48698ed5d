"""A real store with many committed shards, written cheaply: for tests and benches of how
per-shard bookkeeping grows with the number of committed shards.

The store holds prompts only (no SAE sites), one prompt per shard. Shard 0
is written and committed through ``write_shard`` and ``commit_shard`` like
any job's; every other shard is a byte-for-byte copy of shard 0's objects
under its own prefix (a shard's objects do not name their shard, so each
copy is a valid shard holding the same prompt) committed through
``commit_shard`` with its own entry. Copying skips re-encoding and
re-reading thousands of identical shards: 16,000 shards take seconds.
"""

from __future__ import annotations

from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import StoreLayout
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.shard_io import shard_prefix

PROMPT = PromptRecord(text="When Mary and John went to the store, John gave a drink to")
TOKEN_IDS = [1, 5, 9, 13, 2, 7, 11]


def prompts_layout(job_hash: str = "many-shards") -> StoreLayout:
    """A prompts-only layout of one prompt per shard."""
    return StoreLayout(sites=[], gradients=False, shard_size=1, job_hash=job_hash)


def commit_many_shards(url: str, n_shards: int) -> FeatureStore:
    """Create a store at ``url`` (replacing one there) with shards ``0..n_shards-1`` committed.

    Returns the driver-side handle that committed them (its manifest in memory).
    """
    store = FeatureStore.create(url, prompts_layout(), overwrite=True)
    first = store.write_shard(0, [PROMPT], [TOKEN_IDS], {})
    store.commit_shard(first)
    template = store.location.read_prefix(shard_prefix(0))
    relative = {key.removeprefix(shard_prefix(0)): data for key, data in template.items()}
    for shard_id in range(1, n_shards):
        prefix = shard_prefix(shard_id)
        store.location.write_many({prefix + key: data for key, data in relative.items()})
        entry = first.model_copy(update={"shard_id": shard_id, "prompt_start": shard_id})
        # The copies are shard 0's verified bytes: reading each back proves nothing new.
        store.commit_shard(entry, verify=False)
    store.flush_index()
    return store
