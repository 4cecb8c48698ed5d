"""``top-attributions``: corpus-wide rankings by a·∂m/∂a, read from the merged index.

"Which features push the metric most over the store", "which prompts does
feature i push most" and "at which positions" are each one sort of index
arrays (``attribution_index.py``); no shard is read.
"""

from __future__ import annotations

import numpy as np

from circuitscan.schemas.rankings import AttributionRanking, RankBy, RankedAttribution, RankPer
from circuitscan.services.store.attribution_index import EMPTY, NoAttributionIndexError
from circuitscan.services.store.errors import QueryRangeError
from circuitscan.services.store.feature_store import FeatureStore

RANK_PER = ("feature", "prompt", "position")
RANK_BY = ("sum", "abs", "atp", "atp_abs")


def top_attributions(
    store: FeatureStore,
    site: str,
    *,
    per: RankPer = "feature",
    feature: int | None = None,
    n: int = 20,
    rank_by: RankBy = "sum",
) -> AttributionRanking:
    """The ``n`` largest rows of a ranking (see :class:`AttributionRanking`).

    ``per="feature"``: features by |Σ a·g| (``rank_by="sum"``) or Σ |a·g|
    (``"abs"``), or in a paired cache by |Σ AtP| (``"atp"``) or Σ |AtP|
    (``"atp_abs"``), ties by feature id; ``per="prompt"`` / ``"position"``: the
    prompts / entries of ``feature`` by |value|.
    """
    if per not in RANK_PER:
        raise QueryRangeError(f"per must be one of {list(RANK_PER)}, got {per!r}")
    if rank_by not in RANK_BY:
        raise QueryRangeError(f"rank_by must be one of {list(RANK_BY)}, got {rank_by!r}")
    if n < 1:
        raise QueryRangeError(f"n must be at least 1, got {n}")
    d_sae = store.layout.site(site).d_sae
    index = store.index.attribution(site)
    atp, atp_abs = index.atp_total, index.atp_total_abs
    if rank_by in ("atp", "atp_abs") and (atp is None or atp_abs is None):
        raise NoAttributionIndexError(
            f"store {store.url} is not a paired cache, so it has no AtP term (a' − a)·g to "
            "rank by: cache its prompts with paired: true (or rank by sum or abs)"
        )
    rows: list[RankedAttribution] = []
    if per == "feature":
        if feature is not None:
            raise QueryRangeError("per feature ranks every feature: leave out the feature")
        count = store.feature_index(site).count
        keys = {"sum": np.abs(index.total), "abs": index.total_abs}
        if atp is not None and atp_abs is not None:
            keys |= {"atp": np.abs(atp), "atp_abs": atp_abs}
        key = keys[rank_by]
        # A feature active only on corrupted prompts has an AtP term but no clean entry.
        present = np.flatnonzero((count > 0) | (rank_by in ("atp", "atp_abs")) & (key > 0))
        order = present[np.lexsort((present, -key[present]))]
        available = len(order)
        for f in order[:n].tolist():
            rows.append(
                RankedAttribution(
                    feature=f,
                    prompt=None,
                    position=None,
                    value=float(index.total[f]),
                    value_abs=float(index.total_abs[f]),
                    count=int(count[f]),
                    atp=None if atp is None else float(atp[f]),
                    atp_abs=None if atp_abs is None else float(atp_abs[f]),
                )
            )
    else:
        if feature is None:
            raise QueryRangeError(f"per {per} ranks one feature's {per}s: give the feature")
        if not 0 <= feature < d_sae:
            raise QueryRangeError(
                f"feature {feature} is out of range for site {site}: d_sae is {d_sae}"
            )
        prompts = index.top_prompt if per == "position" else index.prompt_prompt
        values = index.top_value if per == "position" else index.prompt_value
        filled = int((prompts[feature] != EMPTY).sum())  # slots fill from the front
        available = filled
        for slot in range(min(n, filled)):
            rows.append(
                RankedAttribution(
                    feature=feature,
                    prompt=int(prompts[feature, slot]),
                    position=int(index.top_position[feature, slot]) if per == "position" else None,
                    value=float(values[feature, slot]),
                    value_abs=None,
                    count=None,
                )
            )
    return AttributionRanking(
        site=site,
        per=per,
        rank_by=rank_by,
        feature=feature,
        n_prompts=store.n_prompts(),
        n_tokens=store.n_tokens(),
        available=available,
        rows=rows,
        error_atp=None if index.error_atp is None else float(index.error_atp[0]),
        error_atp_abs=None if index.error_atp is None else float(index.error_atp[1]),
    )
