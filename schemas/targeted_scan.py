"""How a targeted ablation scan chose its candidates and why it stopped."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

StopRule = Literal["patience", "gap", "budget", "exhausted"]


class TargetedScan(BaseModel):
    """A scan that ablated features (or (prompt, feature) pairs) in a cache store's estimated
    order and stopped early."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    store: str = Field(description="The cache store whose estimates ordered the candidates.")
    top_k: int = Field(ge=1, description="Size of the exact top-K the stopping rule watches.")
    patience: int = Field(ge=1, description="Candidates without a top-K change that stop it.")
    budget: int | None = Field(description="Most candidates it may ablate (None: no cap).")
    n_candidates: int = Field(
        ge=0,
        description="Features active at the scan's positions in the cache (what a full scan "
        "ablates).",
    )
    n_ablated: int = Field(
        ge=0,
        description="Candidates ablated exactly (whole rounds, so up to round_size − 1 past "
        "the stop).",
    )
    stopped_after: int = Field(
        ge=0, description="Candidates ablated when the stopping rule fired (≤ n_ablated)."
    )
    stop_rule: StopRule = Field(
        description="patience: the top-K held for `patience` candidates; gap: the exact K-th "
        "mean |Δm| reached `gap` × the next candidate's estimated mean |Δm|; budget: "
        "`budget` candidates spent; exhausted: every candidate ablated."
    )
    gap: float | Literal["auto"] | None = Field(
        default=None, description="The gap rule's setting (None: not used)."
    )
    gap_ratio: float | None = Field(
        default=None,
        description="The ratio the gap rule compared with when the scan stopped (for auto: "
        "the largest exact / estimated mean |Δm| among the ablated candidates); None: the gap "
        "rule was not used or never had a ratio.",
    )
    full_scan_ablations: int = Field(
        ge=0,
        description="(prompt, feature) ablations a full scan of the same prompts runs (the "
        "cache's active pairs at the scan's positions).",
    )
    ablation_fraction: float = Field(
        description="This scan's (prompt, feature) ablations / full_scan_ablations."
    )
    granularity: Literal["feature", "pair"] = Field(
        default="feature",
        description="feature: candidates are features (every reported value exact); pair: "
        "candidates are (prompt, feature) pairs, counted by n_candidates, n_ablated, "
        "stopped_after, patience and budget.",
    )
    gap_ratio_low: float | None = Field(
        default=None,
        description="Pair-level scans: the low end of the range an estimated pair's "
        "|Δm| / |estimate| was taken to lie in (gap_ratio the high end); None: a feature-level "
        "scan, or no range yet.",
    )
