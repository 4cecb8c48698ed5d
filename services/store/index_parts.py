"""Folding shards' parts into the merged index: decoded per site, folded on threads.

A shard's part of a fold, per site, is its index summary in one of three
forms (index_writer.py finds which): the encoded summary a worker sent (held
by the driver) or an older writer stored, the summary's arrays read back
from a run (index_runs.py), or, for shards written before workers sent
summaries, the summaries computed from its checked arrays. ``fold_parts``
decodes them and folds every site's activation rows and attribution rows
(index_fold.py) on threads of their own: they are separate arrays, and numpy
releases the GIL for the long passes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from circuitscan.services.store.attribution_index import AttributionIndex, AttributionSummary
from circuitscan.services.store.errors import CorruptIndexError
from circuitscan.services.store.index_chunks import chunks_of
from circuitscan.services.store.index_fold import fold_attributions, fold_summaries
from circuitscan.services.store.packed_arrays import PackedArraysError
from circuitscan.services.store.shard_summary import (
    decode_site_summary,
    site_summary_from_arrays,
)
from circuitscan.services.store.summaries import FeatureIndex, ShardSummary

Decoded = tuple[ShardSummary, AttributionSummary | None]
# One shard's part of a site's fold: (shard id, its encoded summary, its summary's
# arrays, or its decoded summaries).
Part = tuple[int, bytes | dict[str, np.ndarray] | Decoded]


def fold_parts(
    index: dict[str, FeatureIndex],
    attribution: dict[str, AttributionIndex] | None,
    parts: dict[str, list[Part]],
    prompt_start: Callable[[int], int],
    url: str,
    dirty: dict[str, set[int]],
) -> None:
    """Fold every site's ``parts`` (in the order given) into ``index`` and ``attribution``
    (in place), adding to ``dirty`` the row chunks each site's fold changed as it is
    done. ``prompt_start``: a shard's first prompt (summaries hold prompts relative to
    it)."""
    decoded = {
        label: _decode_site(parts[label], attribution is not None, prompt_start, url)
        for label in index
    }

    def fold_site(label: str, summaries: list[ShardSummary]) -> None:
        fold_summaries(index[label], summaries)
        if summaries:
            touched = np.concatenate([s.features for s in summaries])
            dirty.setdefault(label, set()).update(chunks_of(touched))

    folds: list[Callable[[], None]] = []
    for label in index:
        summaries, terms = decoded[label]
        folds.append(partial(fold_site, label, summaries))
        if attribution is not None:
            folds.append(partial(fold_attributions, attribution[label], terms))
    cores = os.cpu_count() or 1
    if len(folds) > 1 and cores > 1:
        with ThreadPoolExecutor(min(len(folds), cores)) as pool:
            for done in [pool.submit(fold) for fold in folds]:
                done.result()
    else:
        for fold in folds:
            fold()


def _decode_site(
    parts: list[Part], with_terms: bool, prompt_start: Callable[[int], int], url: str
) -> tuple[list[ShardSummary], list[AttributionSummary]]:
    """One site's shards' summaries, in the order given (encoded ones decoded here)."""
    summaries: list[ShardSummary] = []
    terms: list[AttributionSummary] = []
    for shard_id, part in parts:
        if isinstance(part, tuple):
            summary, attribution = part
        else:
            summary, attribution = _decoded(shard_id, part, prompt_start(shard_id), url)
        summaries.append(summary)
        if with_terms:
            if attribution is None:
                raise CorruptIndexError(f"shard {shard_id} of {url} has no attribution summary")
            terms.append(attribution)
    return summaries, terms


def _decoded(shard_id: int, part: bytes | dict[str, np.ndarray], start: int, url: str) -> Decoded:
    try:
        if isinstance(part, bytes):
            return decode_site_summary(part, start)
        return site_summary_from_arrays(part, start)
    except (PackedArraysError, KeyError) as exc:  # matched its checksum: a bad writer
        raise CorruptIndexError(
            f"shard {shard_id} of {url}: its index summary does not decode ({exc})"
        ) from exc
