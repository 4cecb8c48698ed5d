"""What a feature store consists of: the only keys replacing a store may delete.

A store is its layout document (``zarr.json`` with the circuitscan layout in
its attributes), its writer lease and the folders below. Replacing a store
(``circuitscan run --overwrite``) deletes these and nothing else, and a
location that holds anything but a store is never replaced: a user's own
files next to or instead of a store are not ours to delete. A new top-level
object or folder of the store layout is added here, or replacing a store
leaves it behind (tests/integration/test_store_overwrite.py checks that a
replaced store keeps nothing of the old one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from circuitscan.services.store.backends import Backend
from circuitscan.services.store.errors import NotAStoreError

LAYOUT_KEY = "zarr.json"
LEASE_KEY = "lease.json"
INPUTS_KEY = "inputs.json"  # the digest of the job's prompts (services/jobs/input_digest.py)
RECORD_KEY = "job.json"  # the layout's copy and the results written (services/store/job_record.py)

# Folders: shard data, manifest entries, merged-index generations, job
# results, analyses.
STORE_PREFIXES = ("shards/", "manifest/", "index/", "results/", "analyses/")
STORE_OBJECTS = (LAYOUT_KEY, LEASE_KEY, INPUTS_KEY, RECORD_KEY)


def is_store_key(key: str) -> bool:
    """Whether ``key`` belongs to the store layout (as opposed to anything else there)."""
    return key in STORE_OBJECTS or key.startswith(STORE_PREFIXES)


def describe_keys(keys: Iterable[str], limit: int = 8) -> str:
    """What a listing holds, by top-level name: ``notes.txt, data/ (3 files)``."""
    tops: Counter[str] = Counter()
    for key in keys:
        head, sep, _ = key.partition("/")
        tops[head + sep] += 1
    names = [
        f"{name} ({count} files)" if name.endswith("/") and count > 1 else name
        for name, count in sorted(tops.items())
    ]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def clear_store(location: Backend) -> list[str]:
    """Delete the store's own objects (its lease excepted); return the other keys, kept.

    The caller has checked that ``location`` holds a store. The lease stays:
    it belongs to the driver that is replacing the store.
    """
    keys = location.list_keys("")
    location.delete_keys(key for key in keys if is_store_key(key) and key != LEASE_KEY)
    location.remove_empty_folders(STORE_PREFIXES)
    return [key for key in keys if not is_store_key(key)]


def refuse_non_store(location: Backend, url: str) -> None:
    """NotAStoreError naming what is there when ``location`` (which holds no store) is not
    empty: a store is made only where nothing else lives (a writer lease alone is fine)."""
    found = [key for key in location.list_keys("") if key != LEASE_KEY]
    if found:
        raise NotAStoreError(
            f"{url} is not empty and holds no feature store (it holds {describe_keys(found)}); "
            "it is never replaced, --overwrite or not: use an empty or new location, "
            "or move those files away"
        )
