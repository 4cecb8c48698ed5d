"""A shard's index summary: everything the merged index folds in of one site, one object.

The worker that writes a shard also computes, per site, its index summary (a
packed_arrays object): the site's ShardSummary (counts, totals, maxima,
sparse histograms, top activation candidates) and, in stores with gradients,
its AttributionSummary (Σ a·g, Σ |a·g|, top |a·g| entries and prompts, a
paired cache's AtP sums). It is not stored: it goes back to the driver with
the shard's entry (``ShardEntry.index_summaries``), so the index fold never
reads a shard and decodes the summaries without zarr. Shards written while
summaries were stored hold them as ``sites/<label>/index_summary`` in their
pack (``summary_key``), checked against the entry when folded.

Both summaries come from the same functions the driver used to apply to the
shard's arrays read back (``summarize_shard``, ``shard_attribution`` then
``summarize_attribution``), on the values as stored (encoded then decoded),
so a worker's summary folds to the same index bytes as the driver's
computation. Shards written before index summaries existed keep their
``summary/`` and ``top/`` arrays and are folded from those (index_writer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from circuitscan.services.store.attribution_index import (
    AttributionSummary,
    shard_attribution,
    summarize_attribution,
)
from circuitscan.services.store.encoding import exact_values, feature_id_dtype, values_back
from circuitscan.services.store.packed_arrays import RAW, pack_arrays, unpack_arrays
from circuitscan.services.store.paired_io import PairedSite
from circuitscan.services.store.summaries import ShardSummary

if TYPE_CHECKING:
    from circuitscan.pipelines.site_cache import SiteCache
    from circuitscan.schemas.store import StoreLayout
    from circuitscan.services.store.shard_io import PromptShard, SiteShard

INDEX_SUMMARY = "index_summary"


def summary_key(label: str) -> str:
    """The site's index summary, relative to the shard's prefix."""
    return f"sites/{label}/{INDEX_SUMMARY}"


def _narrow(values: np.ndarray) -> np.ndarray:
    """The narrowest unsigned dtype that holds every value (small counts and indices)."""
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)


def _exact32(values: np.ndarray) -> np.ndarray:
    """float64 terms as float32 when that is exact (products of 16-bit values mostly are)."""
    single = values.astype(np.float32)
    return single if np.array_equal(single.astype(np.float64), values) else values


def encode_site_summary(
    summary: ShardSummary,
    attribution: AttributionSummary | None,
    prompt_start: int,
    d_sae: int,
) -> bytes:
    """One site's index summary object (prompts stored local to the shard)."""
    ids = feature_id_dtype(d_sae)
    arrays: dict[str, np.ndarray] = {
        "features": summary.features.astype(ids),
        "count": _narrow(summary.count),
        "total": summary.total.astype(np.float64),
        "max": exact_values(summary.max),
        "top_feature": summary.top_feature.astype(ids),
        "top_prompt": _narrow(summary.top_prompt.astype(np.int64) - prompt_start),
        "top_position": _narrow(summary.top_position),
        "top_value": exact_values(summary.top_value),
    }
    if summary.hist_cell is not None and summary.hist_count is not None:
        arrays["hist_cell"] = _narrow(summary.hist_cell)
        arrays["hist_count"] = _narrow(summary.hist_count)
    elif summary.hist is not None:  # a dense histogram (a summary made from old arrays)
        arrays["hist"] = _narrow(summary.hist)
    if attribution is not None:
        a = attribution
        arrays |= {
            "ag_features": a.features.astype(ids),
            "ag_total": a.total,
            "ag_total_abs": a.total_abs,
            "ag_top_feature": a.top_feature.astype(ids),
            "ag_top_prompt": _narrow(a.top_prompt - prompt_start),
            "ag_top_position": _narrow(a.top_position),
            "ag_top_value": _exact32(a.top_value),
            "ag_prompt_feature": a.prompt_feature.astype(ids),
            "ag_prompt_prompt": _narrow(a.prompt_prompt - prompt_start),
            "ag_prompt_value": a.prompt_value,
        }
        if a.atp_features is not None:
            assert a.atp_total is not None and a.atp_total_abs is not None
            assert a.error_atp is not None
            arrays |= {
                "atp_features": a.atp_features.astype(ids),
                "atp_total": a.atp_total,
                "atp_total_abs": a.atp_total_abs,
                "error_atp": a.error_atp,
            }
    # Not stored: it travels to the driver, which decodes it once (RAW: a copy each way).
    return pack_arrays(arrays, RAW)


def decode_site_summary(
    raw: bytes, prompt_start: int
) -> tuple[ShardSummary, AttributionSummary | None]:
    """Inverse of ``encode_site_summary`` (PackedArraysError when it does not decode)."""
    return site_summary_from_arrays(unpack_arrays(raw), prompt_start)


def site_summary_from_arrays(
    arrays: dict[str, np.ndarray], prompt_start: int
) -> tuple[ShardSummary, AttributionSummary | None]:
    """The summaries ``encode_site_summary`` packed, from its arrays (KeyError when one
    is missing)."""

    def wide(name: str) -> np.ndarray:
        return arrays[name].astype(np.int64)

    # Ids, counts and positions stay in their narrow stored dtypes (the fold widens
    # each batch once, not each shard); prompts are made global here.
    summary = ShardSummary(
        features=arrays["features"],
        count=arrays["count"],
        total=arrays["total"].astype(np.float64, copy=False),
        max=values_back(arrays["max"]),
        top_feature=arrays["top_feature"],
        top_prompt=wide("top_prompt") + prompt_start,
        top_position=arrays["top_position"],
        top_value=values_back(arrays["top_value"]),
        # Dense histograms: summaries written before they were sparse.
        hist=arrays.get("hist"),
        hist_cell=arrays.get("hist_cell"),
        hist_count=arrays.get("hist_count"),
    )
    if "ag_features" not in arrays:
        return summary, None
    attribution = AttributionSummary(
        features=arrays["ag_features"],
        total=arrays["ag_total"].astype(np.float64, copy=False),
        total_abs=arrays["ag_total_abs"].astype(np.float64, copy=False),
        top_feature=arrays["ag_top_feature"],
        top_prompt=wide("ag_top_prompt") + prompt_start,
        top_position=arrays["ag_top_position"],
        top_value=arrays["ag_top_value"],  # float32 only where that is exact
        prompt_feature=arrays["ag_prompt_feature"],
        prompt_prompt=wide("ag_prompt_prompt") + prompt_start,
        prompt_value=arrays["ag_prompt_value"].astype(np.float64, copy=False),
    )
    if "atp_features" in arrays:
        attribution.atp_features = arrays["atp_features"]
        attribution.atp_total = arrays["atp_total"].astype(np.float64, copy=False)
        attribution.atp_total_abs = arrays["atp_total_abs"].astype(np.float64, copy=False)
        attribution.error_atp = arrays["error_atp"].astype(np.float64, copy=False)
    return summary, attribution


def paired_site(cache: SiteCache, layout: StoreLayout, d_sae: int) -> PairedSite:
    """The corrupted side of a site cache as a reader decodes it (values as stored)."""
    from circuitscan.services.store.shard_io import decode_values, encode_values

    side = cache.corrupt
    assert side is not None
    dtype = layout.value_dtype
    return PairedSite(
        token_offsets=side.token_offsets(cache.n_tokens).numpy().astype(np.int64),
        feature_ids=side.feature_ids.to("cpu").numpy().astype(feature_id_dtype(d_sae)),
        activations=decode_values(encode_values(side.activations, dtype), dtype),
        gradients=decode_values(encode_values(side.gradients, dtype), dtype),
        error_atp=side.error_atp.to("cpu").float().numpy().astype(np.float32),
    )


def site_summary_bytes(
    layout: StoreLayout,
    d_sae: int,
    summary: ShardSummary,
    prompt_start: int,
    site: SiteShard,
    prompts: PromptShard,
    paired: PairedSite | None,
) -> bytes:
    """The index summary a worker writes for one site of its shard (``site``: the site's
    arrays as a reader decodes them)."""
    attribution = None
    if layout.gradients:
        terms = shard_attribution(site, prompts, prompt_start, paired, d_sae)
        attribution = summarize_attribution(terms, layout.examples_per_feature)
    return encode_site_summary(summary, attribution, prompt_start, d_sae)
