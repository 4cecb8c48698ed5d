"""Read-side queries over a FeatureStore's committed shards.

Every query reads only what it needs: a (prompt, position) lookup decodes
one shard's site arrays (cached by the store), top examples come from the
merged per-feature index, never from a scan. numpy only: the tensor views of
a store (``dense_slice``, ``iter_shards``) live in ``tensor_reads``, so that the
CLI's store commands start without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from circuitscan.schemas.store import ActiveFeatures, FeatureExample, FeatureSummary
from circuitscan.services.store.errors import QueryRangeError, StoreError
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.shard_io import decode_values
from circuitscan.services.store.summaries import EMPTY

Decode = Callable[[Sequence[int]], list[str]]


def _check_feature(store: FeatureStore, site: str, feature: int) -> int:
    d_sae = store.layout.site(site).d_sae
    if not 0 <= feature < d_sae:
        raise QueryRangeError(
            f"feature {feature} is out of range for site {site}: d_sae is {d_sae}"
        )
    return d_sae


def token_slot(store: FeatureStore, prompt: int, position: int) -> tuple[int, int, int]:
    """(shard id, shard-local token index, token id) of a (prompt, position)."""
    try:
        entry = store.shard_of_prompt(prompt)
    except StoreError as error:
        raise QueryRangeError(str(error)) from error
    prompts = store.prompt_shard(entry.shard_id)
    local = prompt - entry.prompt_start
    start, stop = int(prompts.prompt_offsets[local]), int(prompts.prompt_offsets[local + 1])
    if not 0 <= position < stop - start:
        raise QueryRangeError(
            f"position {position} is out of range for prompt {prompt}: it has {stop - start} "
            f"tokens (positions 0..{stop - start - 1})"
        )
    return entry.shard_id, start + position, int(prompts.token_ids[start + position])


def features_at(
    store: FeatureStore,
    site: str,
    prompt: int,
    position: int,
    *,
    sort_by: Literal["attribution", "activation"] = "attribution",
    limit: int | None = None,
) -> ActiveFeatures:
    """Features active at (prompt, position), sorted by |a·g| (or by activation), descending.

    Without stored gradients, ``sort_by='attribution'`` falls back to activation.
    """
    store.layout.site(site)
    shard_id, token, token_id = token_slot(store, prompt, position)
    ids, acts, grads, error_norm, dropped_mass = _token_entries(store, site, shard_id, token)
    attr = acts * grads if grads is not None else None
    key = np.abs(attr) if (sort_by == "attribution" and attr is not None) else acts
    order = np.lexsort((ids, -key))[:limit]
    return ActiveFeatures(
        site=site,
        prompt=prompt,
        position=position,
        token_id=token_id,
        feature_ids=ids[order].tolist(),
        activations=acts[order].tolist(),
        gradients=grads[order].tolist() if grads is not None else None,
        attributions=attr[order].tolist() if attr is not None else None,
        error_norm=error_norm,
        dropped_mass=dropped_mass,
    )


def _token_entries(
    store: FeatureStore, site: str, shard_id: int, token: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float, float]:
    """(feature ids, activations, gradients, error norm, dropped mass) of one stored token.

    From the decoded shard when it is cached; otherwise only the chunks that
    hold this token are read (a point query must not decode a whole shard).
    """
    data = store.cached_site_shard(shard_id, site)
    if data is not None:
        lo, hi = int(data.token_offsets[token]), int(data.token_offsets[token + 1])
        return (
            data.feature_ids[lo:hi].astype(np.int64),
            data.activations[lo:hi],
            data.gradients[lo:hi] if data.gradients is not None else None,
            float(data.error_norm[token]),
            float(data.dropped_mass[token]) if data.dropped_mass is not None else 0.0,
        )
    base, dtype = f"sites/{site}/", store.layout.value_dtype
    offsets = store.read_rows(shard_id, base + "token_offsets", token, token + 2)
    lo, hi = int(offsets[0]), int(offsets[1])
    grads = None
    if store.layout.gradients:
        grads = decode_values(store.read_rows(shard_id, base + "gradients", lo, hi), dtype)
    dropped = 0.0
    if store.layout.top_k_per_token is not None:
        dropped = float(store.read_rows(shard_id, base + "dropped_mass", token, token + 1)[0])
    return (
        store.read_rows(shard_id, base + "feature_ids", lo, hi).astype(np.int64),
        decode_values(store.read_rows(shard_id, base + "activations", lo, hi), dtype),
        grads,
        float(store.read_rows(shard_id, base + "error_norm", token, token + 1)[0]),
        dropped,
    )


def top_examples(
    store: FeatureStore,
    site: str,
    feature: int,
    n: int = 20,
    *,
    context: int = 8,
    decode: Decode | None = None,
) -> list[FeatureExample]:
    """The n top-activating (prompt, position) hits of a feature, with ±context tokens.

    ``decode`` maps token ids to strings (e.g. ``lambda ids: [tok.decode([i]) for i in ids]``);
    without it only token ids are returned. At most ``examples_per_feature`` hits exist.
    """
    _check_feature(store, site, feature)
    index = store.feature_index(site)
    out = []
    for slot in range(min(n, index.top_prompt.shape[1])):
        prompt = int(index.top_prompt[feature, slot])
        if prompt == EMPTY:
            break
        position = int(index.top_position[feature, slot])
        tokens = store.prompt_tokens(prompt)
        start, stop = max(0, position - context), min(len(tokens), position + context + 1)
        window = [int(t) for t in tokens[start:stop]]
        out.append(
            FeatureExample(
                prompt=prompt,
                position=position,
                activation=float(index.top_value[feature, slot]),
                context_token_ids=window,
                context=decode(window) if decode is not None else None,
                hit_index=position - start,
            )
        )
    return out


def feature_summary(store: FeatureStore, site: str, feature: int) -> FeatureSummary:
    """Count, sum, max and frequency of one feature over all committed shards."""
    _check_feature(store, site, feature)
    index = store.feature_index(site)
    count, total = int(index.count[feature]), float(index.total[feature])
    tokens = store.n_tokens()
    return FeatureSummary(
        site=site,
        feature=feature,
        count=count,
        total=total,
        max=float(index.max[feature]) if count else 0.0,
        mean_when_active=total / count if count else 0.0,
        frequency=count / tokens if tokens else 0.0,
    )
