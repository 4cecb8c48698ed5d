"""Corpus-wide attribution rankings: what ``top-attributions`` queries of a store answer.

The term ranked is ``a·∂m/∂a`` of each stored (token, feature) entry (metric
units): activation times the gradient of the job's metric. Its negative is
the linear estimate of zero-ablating that feature at that token, so a large
positive sum means the feature pushes the metric up over the store. A paired
cache also ranks features by the AtP term ``(a' − a)·∂m/∂a`` (patching in the
corrupted prompt's activation; ``rank_by`` atp / atp_abs).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(frozen=True, extra="forbid")

RankPer = Literal["feature", "prompt", "position"]
RankBy = Literal["sum", "abs", "atp", "atp_abs"]


class RankedAttribution(BaseModel):
    """One row of a ranking: a feature over the store, or one of a feature's prompts/positions."""

    model_config = _STRICT
    feature: int = Field(ge=0, description="Feature id.")
    prompt: int | None = Field(
        description="Global prompt index (per prompt or position; None for a feature's total)."
    )
    position: int | None = Field(
        description="Token position, BOS = 0 (per position only; None otherwise)."
    )
    value: float = Field(
        description="Σ a·∂m/∂a (metric units): over the whole store (per feature), over the "
        "prompt's positions (per prompt), or the one entry's term (per position)."
    )
    value_abs: float | None = Field(
        description="Σ |a·∂m/∂a| over the whole store (per feature; None otherwise)."
    )
    count: int | None = Field(
        description="Entries (tokens where the feature is stored) summed (per feature only)."
    )
    atp: float | None = Field(
        default=None,
        description="Σ over the store's tokens of the AtP term (a' − a)·∂m/∂a (metric units; "
        "per feature of a paired cache only).",
    )
    atp_abs: float | None = Field(
        default=None,
        description="Σ |(a' − a)·∂m/∂a| over the store's tokens (per feature of a paired "
        "cache only).",
    )


class AttributionRanking(BaseModel):
    """The answer of a top-attributions query, from the store's merged index (no shard scan)."""

    model_config = _STRICT
    site: str = Field(description="SAE site label.")
    per: RankPer = Field(
        description="feature: features over the whole store; prompt / position: one "
        "feature's prompts (Σ over positions) or (prompt, position) entries."
    )
    rank_by: RankBy = Field(
        description="sum: |Σ a·g| (net push); abs: Σ |a·g| (total push either way); atp: "
        "|Σ (a' − a)·g|; atp_abs: Σ |(a' − a)·g| (paired caches). Per prompt and position "
        "rows are always by |a·g|."
    )
    feature: int | None = Field(description="The feature asked about (per prompt/position).")
    n_prompts: int = Field(ge=0, description="Prompts in the store's committed shards.")
    n_tokens: int = Field(ge=0, description="Tokens in the store's committed shards.")
    available: int = Field(
        ge=0,
        description="Rows the index holds for this query (features with entries, or the "
        "feature's kept prompts/positions: at most examples_per_feature).",
    )
    rows: list[RankedAttribution] = Field(description="Largest first.")
    error_atp: float | None = Field(
        default=None,
        description="The site's SAE error node: Σ of its AtP term (e(x') − e(x))·∂m/∂x over "
        "the store's tokens (paired caches only).",
    )
    error_atp_abs: float | None = Field(
        default=None, description="Σ |·| of the error node's AtP term (paired caches only)."
    )
