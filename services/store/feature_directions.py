"""A store's per-site feature directions: logit effects and reading heads of every feature.

Computed from the model's and SAE's weights (``pipelines/analyses/
feature_directions.py``) where they are loaded (``circuitscan analyze
feature-directions STORE``) and kept beside the cache, so a feature page
reads one row instead of loading a model:

    directions/<label>.npz    top_ids, top_values, bottom_ids, bottom_values,
                              head_layers, head_indices, head_gains  ([d_sae, k])
    directions/<label>.json   the SAE fingerprint they belong to, k, heads and the
                              npz object's checksum (written last: it makes them visible)

A reader checks the checksum (damage is a CorruptResultError naming the
object) and the fingerprint (directions of another SAE than the site's are
not shown). Arrays are read once per open store and kept.
"""

from __future__ import annotations

import io
import weakref
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from circuitscan.services.store.backends import read_bytes, write_bytes
from circuitscan.services.store.errors import CorruptResultError
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.shard_io import checksum

PREFIX = "directions/"
ARRAYS = (
    "top_ids", "top_values", "bottom_ids", "bottom_values",
    "head_layers", "head_indices", "head_gains",
)  # fmt: skip

_LOADED: weakref.WeakKeyDictionary[FeatureStore, dict[str, dict[str, np.ndarray] | None]] = (
    weakref.WeakKeyDictionary()
)


class DirectionsInfo(BaseModel):
    """The document that makes a site's feature directions visible."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str = Field(description="SAE site label.")
    sae_fingerprint: str = Field(
        description="Fingerprint of the SAE the arrays were computed from."
    )
    k: int = Field(ge=0, description="Promoted / suppressed tokens kept per feature.")
    heads: int = Field(ge=0, description="Reading heads kept per feature.")
    npz_checksum: str = Field(description="Checksum of directions/<label>.npz.")


def write_directions(store: FeatureStore, site: str, arrays: dict[str, np.ndarray]) -> None:
    """Keep ``arrays`` (every name of ARRAYS, numpy, [d_sae, ...]) as ``site``'s directions."""
    layout = store.layout.site(site)
    missing = [name for name in ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"feature directions need {missing}")
    buffer = io.BytesIO()
    named: dict[str, Any] = {name: np.asarray(arrays[name]) for name in ARRAYS}
    np.savez_compressed(buffer, **named)
    data = buffer.getvalue()
    info = DirectionsInfo(
        site=site,
        sae_fingerprint=layout.sae_fingerprint,
        k=int(arrays["top_ids"].shape[1]),
        heads=int(arrays["head_layers"].shape[1]),
        npz_checksum=checksum(data),
    )
    write_bytes(store.backend, f"{PREFIX}{site}.npz", data)
    write_bytes(store.backend, f"{PREFIX}{site}.json", info.model_dump_json().encode())
    _LOADED.pop(store, None)


def _load(store: FeatureStore, site: str) -> dict[str, np.ndarray] | None:
    cached = _LOADED.setdefault(store, {})
    if site in cached:
        return cached[site]
    raw = read_bytes(store.backend, f"{PREFIX}{site}.json")
    if raw is None:
        cached[site] = None
        return None
    try:
        info = DirectionsInfo.model_validate_json(raw)
    except ValueError as exc:
        raise CorruptResultError(f"{PREFIX}{site}.json of {store.url} is unreadable") from exc
    if info.sae_fingerprint != store.layout.site(site).sae_fingerprint:
        cached[site] = None  # computed for another SAE than this store's: not this site's
        return None
    data = read_bytes(store.backend, f"{PREFIX}{site}.npz")
    if data is None or checksum(data) != info.npz_checksum:
        raise CorruptResultError(
            f"{PREFIX}{site}.npz of {store.url} is missing or fails its checksum; rerun "
            "circuitscan analyze feature-directions"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        arrays = {name: loaded[name] for name in ARRAYS}
    cached[site] = arrays
    return arrays


def has_directions(store: FeatureStore, site: str) -> bool:
    """Whether the store holds feature directions for ``site`` (of the site's own SAE)."""
    return _load(store, site) is not None


def feature_direction_row(store: FeatureStore, site: str, feature: int) -> dict[str, Any] | None:
    """One feature's row of every array (plain lists), or None when the site has none."""
    arrays = _load(store, site)
    if arrays is None:
        return None
    return {name: arrays[name][feature].tolist() for name in ARRAYS}
