"""Everything a feature page shows, in one payload (browser, report and export read it).

Built by ``services/store/feature_page.py`` from a store's merged index and
stored directions, never from a scan of the store.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.analyses import TokenEffect
from circuitscan.schemas.store import FeatureSummary

_STRICT = ConfigDict(frozen=True, extra="forbid")


class ActivationHistogram(BaseModel):
    """Activations of a feature over the store, per fixed bin of |value|."""

    model_config = _STRICT
    edges: list[float] = Field(
        description="Bin edges, len(counts) + 1 (half-octave bins; the outer bins also hold "
        "values beyond them)."
    )
    counts: list[int] = Field(description="Activations per bin.")
    covered: int = Field(
        ge=0,
        description="Activations the histogram counts: less than the feature's count when "
        "some shards were written before stores kept histograms.",
    )


class PageExample(BaseModel):
    """One occurrence of a feature with its context and the feature's value on every token."""

    model_config = _STRICT
    prompt: int = Field(description="Global prompt index.")
    position: int = Field(description="Token position of the hit (BOS is 0).")
    activation: float = Field(description="Feature activation at the hit (SAE units).")
    token_ids: list[int] = Field(description="Token ids of the context window.")
    tokens: list[str] | None = Field(description="Decoded context tokens (None: no tokenizer).")
    values: list[float] = Field(
        description="The feature's activation on each context token (0 where it is not stored)."
    )
    hit_index: int = Field(description="Index of the hit inside the window.")


class ReadingHead(BaseModel):
    """An attention head whose OV circuit carries the feature's direction forward."""

    model_config = _STRICT
    layer: int = Field(ge=0, description="Layer of the head.")
    head: int = Field(ge=0, description="Query head index.")
    gain: float = Field(
        description="‖norm(d̂)·W_V W_O‖: output norm per unit of the unit direction at a "
        "source the head attends to fully."
    )


class MetricPush(BaseModel):
    """A (prompt, position) where the feature moves the store's metric most."""

    model_config = _STRICT
    prompt: int = Field(description="Global prompt index.")
    position: int = Field(description="Token position.")
    attribution: float = Field(description="a·∂m/∂a there (metric units).")


class FeaturePage(BaseModel):
    """One feature of one site: statistics, histogram, examples, logit effects, heads, pushes."""

    model_config = _STRICT
    site: str = Field(description="SAE site label.")
    feature: int = Field(ge=0, description="Feature id.")
    summary: FeatureSummary = Field(description="Count, total, max, frequency.")
    density: float = Field(ge=0, description="Fraction of the store's tokens it fires on.")
    histogram: ActivationHistogram = Field(description="Activation histogram over the store.")
    top: list[PageExample] = Field(description="Top-activating examples, largest first.")
    sampled: list[PageExample] = Field(
        description="Weaker examples: activations spread over the range below the top ones, "
        "from a fixed sample of shards."
    )
    promoted: list[TokenEffect] | None = Field(
        description="Tokens W_U·norm(d̂) raises most (None: the store has no directions)."
    )
    suppressed: list[TokenEffect] | None = Field(
        description="Tokens W_U·norm(d̂) lowers most (None: no directions)."
    )
    reading_heads: list[ReadingHead] | None = Field(
        description="Heads reading the direction most, largest gain first (None: no directions)."
    )
    pushes: list[MetricPush] | None = Field(
        description="Positions where a·∂m/∂a is largest in magnitude (None: no gradients)."
    )
    notes: list[str] = Field(description="What the page lacks and how to add it.")
