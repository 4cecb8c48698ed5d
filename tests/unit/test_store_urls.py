"""Store URLs: one parser, one registry of schemes, one backend class per scheme."""

from __future__ import annotations

from pathlib import Path

import pytest

from circuitscan.schemas.errors import UserInputError
from circuitscan.services.store import FeatureStore, StoreNotFoundError
from circuitscan.services.store.backends import (
    LocalBackend,
    MemoryBackend,
    S3Backend,
    StoreURLError,
    open_location,
    open_root,
    register,
    registry,
)


def test_each_scheme_opens_its_backend_without_io(tmp_path: Path) -> None:
    local = open_location(str(tmp_path / "a"))
    assert isinstance(local, LocalBackend) and local.local_path == tmp_path / "a"
    assert open_location(f"file://{tmp_path}/a").local_path == tmp_path / "a"
    assert open_location("~/x").local_path == Path.home() / "x"
    memory = open_location("memory://unit-urls")
    assert isinstance(memory, MemoryBackend) and memory.url == "memory://unit-urls"
    assert memory.local_path is None
    s3 = open_location("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Backend) and s3.url == "s3://bucket/some/prefix"
    assert s3.child("name").url == "s3://bucket/some/prefix/name"
    assert not (tmp_path / "a").exists()  # opening a URL creates nothing


def test_malformed_urls_are_refused_naming_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(
        StoreURLError, match=r"unsupported store URL 'gs://b/p': use a local path, memory://NAME"
    ):
        open_location("gs://b/p")
    with pytest.raises(StoreURLError, match="need a name"):
        open_location("memory://")
    with pytest.raises(StoreURLError, match="needs a bucket"):
        open_location("s3://")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreURLError, match="not a directory"):
        open_location(str(tmp_path / "file"))
    assert issubclass(StoreURLError, UserInputError)


def test_roots_take_only_schemes_that_hold_named_stores(tmp_path: Path) -> None:
    assert open_root(str(tmp_path)).local_path == tmp_path
    assert open_root("s3://bucket/p").url == "s3://bucket/p"
    with pytest.raises(UserInputError, match="unsupported store root 'memory://x'"):
        open_root("memory://x")
    with pytest.raises(UserInputError, match=r"use a directory or s3://BUCKET/PREFIX"):
        open_root("gs://b/p")


def test_opening_a_missing_local_store_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no feature store"):
        FeatureStore.open(str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()


class _ScratchBackend(MemoryBackend):
    """A new scheme: one class (here reusing the memory medium) and one registration."""

    scheme = "scratch"
    example = "scratch://NAME"

    @classmethod
    def from_address(cls, address: str, url: str) -> MemoryBackend:
        backend = cls(f"scratch/{address}")
        backend.url = url
        return backend


def test_a_new_scheme_is_one_class_and_one_registration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from circuitscan.testing.store_contract import make_layout

    # Registered on a copy of the table, so other tests see only the built-in schemes.
    monkeypatch.setattr(registry, "_SCHEMES", dict(registry._SCHEMES))
    with pytest.raises(StoreURLError):
        open_location("scratch://one")
    register(_ScratchBackend)
    store = FeatureStore.create("scratch://one", make_layout())
    assert isinstance(store.location, _ScratchBackend)
    assert FeatureStore.open("scratch://one").layout == store.layout
    MemoryBackend.drop("scratch/one")
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Other", (_ScratchBackend,), {}))


def test_a_medium_failure_is_a_store_access_error_naming_the_store(tmp_path: Path) -> None:
    """Not the medium's own exception (a traceback at the CLI, a 500 over HTTP): the store,
    what was attempted and the medium's reason, on the infrastructure branch."""
    from circuitscan.schemas.errors import InfrastructureError
    from circuitscan.services.store.errors import StoreAccessError

    (tmp_path / "file").write_text("x")
    under_a_file = open_location(str(tmp_path / "file" / "store"))
    with pytest.raises(StoreAccessError, match=r"cannot write to local directory .*/file/store"):
        under_a_file.write_bytes("zarr.json", b"{}")
    with pytest.raises(StoreAccessError, match="cannot write to local directory"):
        under_a_file.create_object("lease.json", b"{}")
    with pytest.raises(StoreAccessError, match="cannot write to local directory"):
        FeatureStore.create(under_a_file.url, _layout())
    assert under_a_file.read_bytes("zarr.json") is None  # absent, as before: not a failure
    assert issubclass(StoreAccessError, InfrastructureError)
    assert StoreAccessError.http_status == 503 and StoreAccessError.exit_code == 2
    assert not (tmp_path / "file").is_dir() and (tmp_path / "file").read_text() == "x"


def test_every_backends_io_is_translated_a_new_ones_too() -> None:
    """Backend.__init_subclass__ wraps the object I/O of every backend, overrides included."""
    from circuitscan.services.store.backends.base import _IO_METHODS, Backend
    from circuitscan.services.store.errors import StoreAccessError

    class Refusing(MemoryBackend):
        def read_many(self, keys):  # type: ignore[no-untyped-def]
            raise PermissionError("Access Denied")

    for backend in (*registry._SCHEMES.values(), Refusing, Backend):
        for name in _IO_METHODS:
            assert getattr(getattr(backend, name), "__io_translated__", False), (backend, name)
    refusing = Refusing("unit-refusing")
    with pytest.raises(
        StoreAccessError, match="cannot read from in-process memory store 'unit-refusing': Access"
    ):
        refusing.read_bytes("zarr.json")


def _layout():  # type: ignore[no-untyped-def]
    from circuitscan.testing.store_contract import make_layout

    return make_layout()
