"""URL scheme → backend class: the one place store URLs are parsed.

A URL is ``scheme://ADDRESS``; text without ``://`` is a local path (the
``file`` scheme). Adding a storage medium is one Backend subclass and one
``register`` call (the built-in ones are registered in the package's
``__init__``).
"""

from __future__ import annotations

from collections.abc import Iterable

from circuitscan.schemas.errors import UserInputError
from circuitscan.services.store.backends.base import Backend, StoreURLError

LOCAL_SCHEME = "file"

_SCHEMES: dict[str, type[Backend]] = {}


def register(backend: type[Backend]) -> type[Backend]:
    """Make ``backend`` open URLs of its scheme (usable as a class decorator)."""
    if backend.scheme in _SCHEMES and _SCHEMES[backend.scheme] is not backend:
        raise ValueError(f"store URL scheme {backend.scheme!r} is registered twice")
    _SCHEMES[backend.scheme] = backend
    return backend


def split_url(url: str) -> tuple[str, str]:
    """``(scheme, address)`` of a store URL; a plain path is the ``file`` scheme."""
    scheme, sep, address = url.partition("://")
    return (scheme, address) if sep else (LOCAL_SCHEME, url)


def open_location(url: str) -> Backend:
    """The backend for a store URL (no I/O; StoreURLError naming the accepted forms)."""
    scheme, address = split_url(url)
    backend = _SCHEMES.get(scheme)
    if backend is None:
        accepted = _either(cls.example for cls in _SCHEMES.values())
        raise StoreURLError(f"unsupported store URL {url!r}: use {accepted}")
    return backend.from_address(address, url)


def open_root(url: str) -> Backend:
    """The backend for a location holding named stores (the HTTP API's store root).

    UserInputError (a ValueError) when its scheme cannot hold one (e.g. an in-process memory store).
    """
    scheme, _ = split_url(url)
    backend = _SCHEMES.get(scheme)
    if backend is None or backend.root_example is None:
        accepted = _either(cls.root_example for cls in _SCHEMES.values())
        raise UserInputError(f"unsupported store root {url!r}: use {accepted}")
    return open_location(url)


def _either(options: Iterable[str | None]) -> str:
    names = [option for option in options if option]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
