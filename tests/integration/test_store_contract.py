"""The store contract (circuitscan.testing.store_contract) for every backend.

Memory, local directory, and S3 through a real S3-compatible server (moto's
server mode). Each class supplies fresh URLs and a way to reach the stored
bytes that does not go through the backend under test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from s3_server import BUCKET, moto_s3, s3_client

from circuitscan.services.store import drop_memory_store
from circuitscan.services.store.backends import MemoryBackend, open_location
from circuitscan.testing.store_contract import (
    N_SHARDS,
    SITES,
    StoreContract,
    make_layout,
    make_shard,
)
from circuitscan.testing.store_contract import fill_store as _fill

pytestmark = pytest.mark.integration

# Other suites build their stores with the contract's job.
__all__ = ["N_SHARDS", "SITES", "_fill", "make_layout", "make_shard"]


class TestMemoryStore(StoreContract):
    @pytest.fixture(scope="class")
    def new_url(self) -> Iterator[Callable[[], str]]:
        made: list[str] = []

        def make() -> str:
            made.append(f"memory://{uuid.uuid4().hex[:8]}")
            return made[-1]

        yield make
        for url in made:
            drop_memory_store(url)

    def _objects(self, url: str) -> dict:
        location = open_location(url)
        assert isinstance(location, MemoryBackend)
        return location.objects  # the dict zarr's MemoryStore holds, read as a dict

    def raw_read(self, url: str, key: str) -> bytes | None:
        value = self._objects(url).get(key)
        return None if value is None else value.to_bytes()

    def raw_write(self, url: str, key: str, data: bytes) -> None:
        from zarr.core.buffer.cpu import Buffer

        self._objects(url)[key] = Buffer.from_bytes(data)


class TestLocalStore(StoreContract):
    @pytest.fixture(scope="class")
    def new_url(self, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], str]:
        return lambda: str(tmp_path_factory.mktemp("store") / uuid.uuid4().hex[:8])

    def raw_read(self, url: str, key: str) -> bytes | None:
        path = Path(url) / key
        return path.read_bytes() if path.is_file() else None

    def raw_write(self, url: str, key: str, data: bytes) -> None:
        path = Path(url) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class TestFileURLStore(TestLocalStore):
    """The same directories named by ``file://`` URLs."""

    @pytest.fixture(scope="class")
    def new_url(self, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], str]:
        return lambda: "file://" + str(tmp_path_factory.mktemp("store") / uuid.uuid4().hex[:8])

    def raw_read(self, url: str, key: str) -> bytes | None:
        return super().raw_read(url.removeprefix("file://"), key)

    def raw_write(self, url: str, key: str, data: bytes) -> None:
        super().raw_write(url.removeprefix("file://"), key, data)


class TestS3Store(StoreContract):
    @pytest.fixture(scope="class")
    def new_url(self) -> Iterator[Callable[[], str]]:
        with moto_s3():
            yield lambda: f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"

    @staticmethod
    def _key(url: str, key: str) -> str:
        return f"{url.removeprefix(f's3://{BUCKET}/')}/{key}"

    def raw_read(self, url: str, key: str) -> bytes | None:
        client = s3_client()
        try:
            return client.get_object(Bucket=BUCKET, Key=self._key(url, key))["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def raw_write(self, url: str, key: str, data: bytes) -> None:
        s3_client().put_object(Bucket=BUCKET, Key=self._key(url, key), Body=data)
