"""Compute a store's feature directions (logit effects, reading heads) and keep them in it.

``circuitscan analyze feature-directions STORE`` loads the model and SAEs the
store's job spec names (from local files, as a job does), checks them
against the fingerprints the store recorded, and writes each site's
directions (``services/store/feature_directions.py``). Feature pages then
read one row per feature instead of loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.caching import site_label
from circuitscan.pipelines.fingerprint import fingerprint_tensors
from circuitscan.schemas.errors import UserInputError
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.feature_directions import ARRAYS, write_directions


class DirectionsInputError(UserInputError):
    """A store whose model or SAEs cannot be loaded or are not the ones it was written with."""


def directions_arrays(
    model: HookedSAETransformer, sae: SAE[Any], *, k: int = 10, heads: int = 5
) -> dict[str, np.ndarray]:
    """One SAE's feature directions as the numpy arrays a store keeps."""
    from circuitscan.pipelines.analyses.feature_directions import feature_directions

    found = feature_directions(model, sae, k=k, heads=heads)
    arrays = {}
    for name in ARRAYS:
        tensor = getattr(found, name).detach().cpu()
        floating = tensor.is_floating_point()
        arrays[name] = tensor.float().numpy() if floating else tensor.numpy().astype(np.int32)
    return arrays


def store_directions(
    store: FeatureStore,
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]],
    *,
    k: int = 10,
    heads: int = 5,
) -> list[str]:
    """Compute and write the directions of every store site one of ``saes`` belongs to."""
    written = []
    by_label = {site_label(sae): sae for sae in saes}
    for site in store.layout.sites:
        sae = by_label.get(site.label)
        if sae is None:
            continue
        if fingerprint_tensors(sae.state_dict()) != site.sae_fingerprint:
            raise DirectionsInputError(
                f"the SAE given for site {site.label} is not the one the store was written with "
                "(fingerprints differ)"
            )
        write_directions(store, site.label, directions_arrays(model, sae, k=k, heads=heads))
        written.append(site.label)
    return written


def directions_from_spec(store_url: str, *, k: int = 10, heads: int = 5) -> list[str]:
    """Load the model and SAEs of the store's job spec and store every site's directions."""
    from circuitscan.schemas.jobs import JobSpec
    from circuitscan.services.model_loading import load_model
    from circuitscan.services.sae_loading import load_sae

    store = FeatureStore.open(store_url)
    if not store.layout.sites:
        raise DirectionsInputError(f"{store_url} caches no SAE site: it has no feature directions")
    if store.layout.job_spec is None:
        raise DirectionsInputError(
            f"{store_url} records no job spec, so its model and SAEs are unknown; compute them "
            "with circuitscan.services.feature_directions_run.store_directions(store, model, saes)"
        )
    spec = JobSpec.model_validate(store.layout.job_spec)
    loaded = load_model(spec.model)
    if loaded.fingerprint != store.layout.model_fingerprint:
        raise DirectionsInputError(
            f"the model {spec.model} loads with other weights than {store_url} was written with"
        )
    saes = [load_sae(sae_spec, loaded.model).sae for sae_spec in spec.saes]
    return store_directions(store, loaded.model, saes, k=k, heads=heads)
