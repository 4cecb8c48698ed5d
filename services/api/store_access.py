"""Named stores under one root (a directory or an s3:// prefix), opened safely and shared.

A store name is one path segment (letters, digits, ``.``, ``_``, ``-``; no
``..``). In a local root its folder must resolve, symlinks followed, to a
direct child of the root, so neither names nor links reach anything outside
the root (store_roots.py).

An open ``FeatureStore`` caches decoded shards and is not thread-safe, so
each store carries a lock held for the length of one query. Every
``store_refresh_seconds`` an open store in use looks at three version tokens
(a HEAD or a stat each, never a listing): its layout's (replaced: reopen),
its index pointer's (a job's driver rewrites it every few commits and at the
job's end) and its writer lease's (renewed every 30 s while a job runs,
deleted when it ends). Only when the pointer or the lease changed, or
``RELIST_SECONDS`` after the last listing, is the manifest listed, and then
only the new entries are read (``FeatureStore.catch_up``): a store a job is
filling costs a listing per index flush or heartbeat, not every second, and
never a re-read of every entry. A running job's newest commits show at its
next flush or heartbeat, all of them once it ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from circuitscan.services.api.errors import ApiError
from circuitscan.services.api.store_roots import StoreRoot, store_root
from circuitscan.services.store import FeatureStore, StoreNotFoundError
from circuitscan.services.store.index_writer import INDEX_POINTER
from circuitscan.services.store.store_keys import LEASE_KEY

log = logging.getLogger(__name__)

STORE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STORE_NAME_PATTERN = STORE_NAME.pattern
_OPEN_STORES = 32
# The longest a store's manifest goes unlisted while in use, whatever its tokens say (a
# writer that takes no lease and flushes no index is still seen).
RELIST_SECONDS = 60.0

Decode = Callable[[Sequence[int]], list[str]]


def check_store_name(name: str) -> str:
    """The name itself when it is one safe path segment; ApiError 400 otherwise."""
    if not STORE_NAME.fullmatch(name) or ".." in name:
        raise ApiError(
            400,
            "invalid store name: use 1-100 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, no '..')",
        )
    return name


@dataclass
class OpenStore:
    """One open store, its lock, and when its manifest was last looked at."""

    name: str
    store: FeatureStore
    layout_version: str  # the root's version token of the store's layout
    checked_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The index pointer's and the lease's version tokens when the manifest was last listed.
    changes: tuple[str | None, str | None] = (None, None)
    listed_at: float = 0.0

    def change_token(self) -> tuple[str | None, str | None]:
        """What moves when a job commits: its index flushes and its lease's heartbeats."""
        location = self.store.location
        return location.version(INDEX_POINTER), location.version(LEASE_KEY)


class StoreRegistry:
    """Resolves, opens and caches the stores under ``root``."""

    def __init__(
        self, root: str | Path, refresh_seconds: float = 1.0, decoded_shards: int = 64
    ) -> None:
        self.root: StoreRoot = store_root(root)
        self.refresh_seconds = refresh_seconds
        self.decoded_shards = decoded_shards
        self._open: OrderedDict[str, OpenStore] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Decode | None] = {}
        self._loading: dict[str, asyncio.Future[Decode | None]] = {}

    # --- names and locations ---------------------------------------------------------

    def location_of(self, name: str) -> str:
        """The URL of store ``name`` under the root (400 for a bad name, 404 when absent)."""
        return self.root.location(check_store_name(name))

    def target_of(self, name: str) -> str:
        """Where a new job's store ``name`` goes."""
        return self.root.target(check_store_name(name))

    def name_of(self, location: str) -> str | None:
        """The store name of a location directly under the root, None for anything else."""
        name = self.root.name_of(location)
        return name if name is not None and STORE_NAME.fullmatch(name) else None

    def names(self) -> list[str]:
        """Names of the entries under the root that hold a store, sorted."""
        found = []
        for name in self.root.candidates():
            if not STORE_NAME.fullmatch(name) or ".." in name:
                continue
            try:
                self.location_of(name)
            except ApiError:
                continue
            found.append(name)
        return sorted(found)

    # --- opening -------------------------------------------------------------------

    def _open_fresh(self, name: str) -> OpenStore:
        location = self.location_of(name)
        version = self.root.version(name)
        self.root.check_contained(name)
        try:
            store = FeatureStore.open(location)
        except StoreNotFoundError as exc:
            raise ApiError(404, f"no store named {name!r}") from exc
        store.site_cache_shards = self.decoded_shards
        now = time.monotonic()
        entry = OpenStore(name=name, store=store, layout_version=version, checked_at=now)
        entry.changes, entry.listed_at = entry.change_token(), now  # listed when first read
        return entry

    def _get(self, name: str) -> OpenStore:
        check_store_name(name)
        with self._lock:
            entry = self._open.get(name)
            if entry is not None:
                self._open.move_to_end(name)
                return entry
        entry = self._open_fresh(name)
        with self._lock:
            entry = self._open.setdefault(name, entry)
            while len(self._open) > _OPEN_STORES:
                self._open.popitem(last=False)
        return entry

    def _maybe_refresh(self, entry: OpenStore) -> OpenStore:
        """Called with the store's lock held: notice replaced stores and new commits."""
        now = time.monotonic()
        if now - entry.checked_at < self.refresh_seconds:
            return entry
        if self.root.version(entry.name) != entry.layout_version:
            fresh = self._open_fresh(entry.name)
            with self._lock:
                self._open[entry.name] = fresh
            return fresh
        changes = entry.change_token()  # read before the listing: a later change is seen next
        if changes != entry.changes or now - entry.listed_at >= RELIST_SECONDS:
            entry.store.catch_up()
            entry.changes, entry.listed_at = changes, now
        entry.checked_at = now
        return entry

    @contextmanager
    def reading(self, name: str) -> Iterator[OpenStore]:
        """Hold store ``name`` for one query (its lock taken, its view up to date)."""
        entry = self._get(name)
        with entry.lock:
            current = self._maybe_refresh(entry)
            if current is entry:
                yield entry
                return
        with current.lock:
            yield current

    # --- token decoding -------------------------------------------------------------

    async def decoder(self, name: str) -> Decode | None:
        """Token-id → text for store ``name``'s model, None when its tokenizer cannot load.

        Loading a tokenizer takes seconds, so it runs in a worker thread (the
        event loop keeps serving) and each model's decoder is loaded once.
        Call it before ``reading``: never await while holding a store's lock.
        """
        entry = self._get(name)
        source = _model_source(entry.store)
        if source not in self._tokenizers:
            # One load per model even when many first requests arrive together.
            if source not in self._loading:
                self._loading[source] = asyncio.ensure_future(
                    run_in_threadpool(_load_decoder, source)
                )
            decode = await asyncio.shield(self._loading[source])
            self._tokenizers.setdefault(source, decode)
            self._loading.pop(source, None)
        return self._tokenizers[source]


def _model_source(store: FeatureStore) -> str:
    spec = store.layout.job_spec or {}
    model = spec.get("model") if isinstance(spec, dict) else None
    return str(model.get("source", "default") if isinstance(model, dict) else "default")


def _load_decoder(source: str) -> Decode | None:
    from circuitscan.schemas.models import ModelSpec
    from circuitscan.services.model_loading import load_tokenizer

    try:
        # Never download on behalf of a request, whatever the stored spec says.
        tokenizer = load_tokenizer(ModelSpec(source=source, allow_download=False))
    except Exception as exc:  # best effort: any loader failure just leaves ids undecoded
        log.warning("no tokenizer for model %r, tokens stay undecoded: %s", source, exc)
        return None
    pieces: dict[int, str] = {}
    pieces_lock = threading.Lock()

    def decode(ids: Sequence[int]) -> list[str]:
        out = []
        for token_id in ids:
            piece = pieces.get(token_id)
            if piece is None:
                piece = tokenizer.decode([token_id])
                with pieces_lock:
                    pieces[token_id] = piece
            out.append(piece)
        return out

    return decode
