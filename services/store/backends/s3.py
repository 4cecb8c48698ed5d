"""Object storage: ``s3://BUCKET/PREFIX`` through s3fs.

The endpoint comes from ``CIRCUITSCAN_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL``
when set (MinIO, moto, ...), credentials from the usual AWS variables.
Object storage charges a round trip per request, so deletes go out as one
bulk request and listings of a root are a single call.

Conditional writes (the writer lease) are S3's conditional requests: a create
is a put with ``If-None-Match: *``, a swap a put (or delete) with
``If-Match`` on the ETag read just before. AWS S3 and MinIO honour both, so
both are atomic there; a server that ignores the headers degrades to a
read-compare-write, which another writer can slip into.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from typing import Any

from zarr.abc.store import Store
from zarr.storage import FsspecStore

from circuitscan.services.store.backends.base import Backend, StoreURLError


def s3_options() -> dict[str, object]:
    """s3fs options from the environment (endpoint override for MinIO/moto/etc.)."""
    # No listings cache: other processes (workers, the driver) change the
    # store under us, and a cached listing would hide their shards.
    # max_concurrency=1: otherwise s3fs sends a HEAD (plus a listing when the
    # key is absent) before every GET to decide on ranged parallel reads, which
    # tripled the requests; store objects are small, parallelism comes from
    # reading many objects at once instead.
    options: dict[str, object] = {
        "asynchronous": True,
        "use_listings_cache": False,
        "max_concurrency": 1,
    }
    endpoint = os.environ.get("CIRCUITSCAN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


class S3Backend(Backend):
    """A store under an S3 (or S3-compatible) prefix."""

    scheme = "s3"
    example = "s3://BUCKET/PREFIX"
    root_example = "s3://BUCKET/PREFIX"
    access_hint = (
        "credentials come from the AWS_* variables or ~/.aws, the endpoint from "
        "CIRCUITSCAN_S3_ENDPOINT or AWS_ENDPOINT_URL"
    )

    @classmethod
    def access_errors(cls) -> tuple[type[BaseException], ...]:
        # botocore's own errors (no credentials, an endpoint it cannot connect to) reach
        # callers untranslated by s3fs; refused requests arrive as OSErrors.
        from botocore.exceptions import BotoCoreError, ClientError

        return (OSError, BotoCoreError, ClientError)

    def __init__(self, path: str) -> None:
        super().__init__(f"s3://{path}")
        self.path = path  # BUCKET/PREFIX, no slashes around it
        self._sync_fs: Any = None

    @classmethod
    def from_address(cls, address: str, url: str) -> S3Backend:
        path = address.strip("/")
        if not path:
            raise StoreURLError(f"s3 store URL needs a bucket: {url!r}")
        return cls(path)

    def _make_store(self) -> Store:
        return FsspecStore.from_url(self.url, storage_options=s3_options())

    def child(self, name: str) -> S3Backend:
        return S3Backend(f"{self.path}/{name}")

    def describe(self) -> str:
        endpoint = s3_options().get("endpoint_url", "the default AWS endpoint")
        return f"object storage {self.url} at {endpoint}"

    @property
    def fs(self) -> Any:
        """A synchronous s3fs filesystem, for the calls zarr's store has no bulk form of."""
        if self._sync_fs is None:
            import fsspec

            self._sync_fs = fsspec.filesystem("s3", **{**s3_options(), "asynchronous": False})
        return self._sync_fs

    def delete_keys(self, keys: Iterable[str]) -> None:
        paths = [f"{self.path}/{key}" for key in keys]
        if paths:
            # One bulk DeleteObjects request per thousand keys, not one per key.
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(paths)

    def create_object(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(f"{self.path}/{key}", data, mode="create")
        except FileExistsError:  # s3fs's name for 412 Precondition Failed here
            return False
        return True

    def swap_object(self, key: str, expected: bytes, data: bytes | None) -> bool:
        info = self._info(key, refresh=True)
        if info is None or "ETag" not in info:
            return False
        path = f"{self.path}/{key}"
        if self.fs.cat_file(path) != expected:
            return False
        bucket, _, name = path.partition("/")
        try:
            # Conditional on the ETag of the bytes just compared: a rewrite
            # in between fails the request instead of being overwritten.
            if data is None:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=info["ETag"])
            else:
                self.fs.call_s3(
                    "put_object", Bucket=bucket, Key=name, Body=data, IfMatch=info["ETag"]
                )
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # s3fs's name for 412 Precondition Failed
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)
        return True

    def _info(self, key: str, *, refresh: bool = False) -> dict[str, Any] | None:
        try:
            return dict(self.fs.info(f"{self.path}/{key}", refresh=refresh))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._info(key) is not None

    def version(self, key: str) -> str | None:
        info = self._info(key)
        if info is None:
            return None
        return str(info.get("ETag") or info.get("LastModified") or info.get("size"))

    def children(self) -> list[str]:
        try:
            entries = self.fs.ls(self.path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(
            entry["name"].rstrip("/").rsplit("/", 1)[-1]
            for entry in entries
            if entry.get("type") == "directory"
        )
