"""Certified verification: a bound on the effect of every node that was not verified.

After the top nodes of a ranking are patched exactly, random subsets of the
remaining (unverified) nodes are patched together (AtP* paper, Kramár et al.
2024, arXiv 2403.00745, its diagnostic for remaining false negatives). Each
node's effect is estimated from the subsets that include it against those that
exclude it, and an upper confidence bound θ is put on the largest mean
absolute effect any of them can have. What the bound assumes is carried in
the result itself (``assumptions``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ASSUMPTIONS: tuple[str, ...] = (
    "Additivity: patching a set of nodes together changes the metric by the sum of their "
    "single-node effects; interactions between patched nodes bias the per-node estimates "
    "(each is then the node's mean marginal effect over random subsets, not its effect "
    "patched alone).",
    "Normal-theory bound: each per-node estimate is a difference of two sample means whose "
    "error is bounded with a Student-t quantile (Welch's degrees of freedom, rounded down); "
    "this is approximate for small samples and heavy-tailed Δm.",
    "Union bound: the confidence holds for all (node, prompt) pairs at once (Bonferroni over "
    "the pairs bounded: those not exactly zero, or every pair in a job cut into shards), so θ "
    "bounds the largest mean |effect| over the prompts of every unverified node at once.",
)


class CertifiedNode(BaseModel):
    """One unverified node's estimate from random-subset patching, in metric units."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    node: str = Field(description="The node's string form.")
    estimate: float = Field(
        description="Mean over prompts of (mean Δm of subsets including the node − mean Δm "
        "of subsets excluding it): the node's estimated signed effect."
    )
    estimate_abs: float = Field(ge=0, description="Mean over prompts of the estimate's |·|.")
    upper: float = Field(
        ge=0,
        description="Mean over prompts of the per-prompt upper confidence bound on |effect|; "
        "infinite when the node was in fewer than 2 subsets or out of fewer than 2.",
    )
    included: int = Field(ge=0, description="Subsets (samples) that patched this node.")


class CertificationResult(BaseModel):
    """An upper confidence bound θ on the largest |effect| of any unverified node."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    theta: float = Field(
        ge=0,
        description="Upper confidence bound on max over unverified nodes of the mean over "
        "prompts of |Δm| (metric units); infinite when some node lacked samples.",
    )
    samples: int = Field(ge=2, description="Random subsets drawn (S).")
    p: float = Field(gt=0, lt=1, description="Inclusion probability of each node in a subset.")
    confidence: float = Field(gt=0, lt=1, description="Confidence level 1 − δ of the bound.")
    delta: float = Field(gt=0, lt=1, description="δ = 1 − confidence.")
    seed: int = Field(description="Seed of the subset draws.")
    mode: str = Field(description="Patch value: corrupt, zero or mean.")
    n_nodes: int = Field(ge=1, description="Unverified nodes the bound covers.")
    n_prompts: int = Field(ge=1, description="Prompts (or prompt pairs) patched.")
    forward_passes: int = Field(
        ge=0,
        description="Patched forward passes over the prompt set (one per subset, the unit in "
        "which verifying one node costs one).",
    )
    patched_rows: int = Field(
        ge=0, description="(subset, prompt) suffix passes actually run (empty patches skipped)."
    )
    closest_node: str = Field(
        description="The node whose estimate came closest to θ (largest mean |estimate|)."
    )
    binding_node: str = Field(description="The node whose upper bound is θ.")
    control: str | None = Field(
        default=None,
        description="The per-node estimate used as a control variate (each subset's Δm less "
        "its nodes' estimates; same expectation, lower variance), or None.",
    )
    nodes: list[CertifiedNode] = Field(description="Every node's estimate, highest bound first.")
    assumptions: list[str] = Field(
        default_factory=lambda: list(ASSUMPTIONS), description="What the bound assumes."
    )

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.theta)

    def statement(self) -> str:
        """The one-line claim, e.g. ``no unverified node exceeds 0.0123 (95 %)``."""
        level = f"{100 * self.confidence:g} %"
        if not self.bounded:
            return f"no bound at {level}: some unverified node was sampled too rarely"
        return f"no unverified node exceeds {self.theta:.4g} ({level})"

    def summary_line(self) -> str:
        """The claim with what it cost and which node came closest."""
        return (
            f"{self.statement()} — {self.n_nodes} unverified nodes, {self.forward_passes} "
            f"subset passes (p = {self.p:g}); closest: {self.closest_node}"
        )


StopRule = Literal["bound", "budget", "exhausted"]


class AutoVerification(BaseModel):
    """``verify_top_k: auto``: how many nodes were verified, and what ended it.

    Nodes are verified in estimate order, ``top_k`` at a time; after each round
    the rest are certified. It stops when θ falls below the smallest exact
    mean |Δm| in the verified top-K (``bound``: then no unverified node can
    belong to the true top-K, at the stated confidence), when ``budget`` nodes
    are verified (``budget``), or when every node is (``exhausted``). Each
    round's bound is taken at δ / rounds (a union bound over the rounds), so
    the claim holds at ``confidence`` whichever round ends it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    top_k: int = Field(ge=1, description="K: the top nodes made complete.")
    budget: int = Field(ge=1, description="Most nodes verified.")
    verified: int = Field(ge=0, description="Nodes verified by exact patching, in all rounds.")
    rounds: int = Field(ge=1, description="Rounds of verification + certification run.")
    max_rounds: int = Field(ge=1, description="Rounds the budget allows (the union bound's R).")
    stopped_by: StopRule = Field(
        description="bound: θ fell below the smallest verified top-K effect; budget: the "
        "budget was spent first; exhausted: every node was verified."
    )
    smallest_top_effect: float = Field(
        ge=0, description="The K-th largest exact mean |Δm| among the verified nodes."
    )
    theta: float | None = Field(
        default=None, ge=0, description="The last round's bound (None: nothing left to bound)."
    )
    confidence: float = Field(gt=0, lt=1, description="Confidence of the claim over all rounds.")
    forward_passes: int = Field(
        ge=0, description="Patched passes over the prompt set: one per verified node and subset."
    )

    @property
    def complete(self) -> bool:
        return self.stopped_by != "budget"

    def statement(self) -> str:
        """``top-20 complete at 95 %: …`` or why it is not."""
        level = f"{100 * self.confidence:g} %"
        head = f"top-{self.top_k}"
        if self.stopped_by == "exhausted":
            return f"{head} exact: every node verified ({self.verified})"
        bound = "∞" if self.theta is None else f"{self.theta:.4g}"
        if self.stopped_by == "bound":
            return (
                f"{head} complete at {level}: no unverified node exceeds {bound} < "
                f"{self.smallest_top_effect:.4g} after verifying {self.verified}"
            )
        return (
            f"{head} not shown complete: budget of {self.budget} verified spent with θ = "
            f"{bound} ≥ {self.smallest_top_effect:.4g}"
        )
