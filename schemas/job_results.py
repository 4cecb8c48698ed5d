"""Job-level results: what an attribute, ablation-scan, splice-eval or DFA job leaves in its store.

Workers write per-shard partial results under each shard's own prefix
(committed with the shard's manifest entry); the driver aggregates the
committed shards into one of these documents and writes it last, so a store
either holds a complete result or none. Readers (CLI, HTTP API) see only these.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.analyses import SpliceEvalRow
from circuitscan.schemas.breakdown import PerPromptArray
from circuitscan.schemas.certification import AutoVerification, CertificationResult
from circuitscan.schemas.targeted_scan import TargetedScan

_STRICT = ConfigDict(frozen=True, extra="forbid")

# "weaker" is what stores written before magnitudes were compared say for an exact
# effect under half its estimate (now "overestimated"); it stays readable.
VerificationStatus = Literal[
    "confirmed", "underestimated", "overestimated", "sign_flipped", "no_effect", "weaker"
]

# confirmed: exact / estimate within [1 / CONFIRM_BAND, CONFIRM_BAND].
CONFIRM_BAND = 2.0


class NodeVerification(BaseModel):
    """Exact activation patching (clean → corrupted) of one node, over the job's prompts."""

    model_config = _STRICT
    exact_mean: float = Field(description="Mean signed Δm of patching the node (metric units).")
    exact_mean_abs: float = Field(description="Mean |Δm| of patching the node (metric units).")
    n_prompts: int = Field(ge=0, description="Prompts where the node exists.")
    status: VerificationStatus = Field(
        description="With ratio = exact mean / estimated mean: confirmed: 1/2 ≤ ratio ≤ 2 "
        "(same sign, within a factor of 2); underestimated: ratio > 2 (the exact effect is "
        "more than twice the estimate, or the estimate is 0); overestimated: 0 < ratio < 1/2; "
        "sign_flipped: ratio < 0; no_effect: exact Δm is 0. Stores written before magnitudes "
        "were compared may say weaker (same sign, under half the estimate)."
    )
    ratio: float | None = Field(
        default=None,
        description="Exact mean / estimated mean (None: the estimate is 0, or a store written "
        "before the ratio was kept).",
    )


class NodeEffect(BaseModel):
    """One node's estimated effect aggregated over the job's prompts."""

    model_config = _STRICT
    node: str = Field(description="The node's string form, e.g. 'feature:L0.resid_post:7@last'.")
    mean: float = Field(description="Mean signed estimated effect (metric units).")
    mean_abs: float = Field(
        description="Mean ranking score (metric units): |estimate| for AtP, the GradDrop score for AtP*."
    )
    n_prompts: int = Field(ge=0, description="Prompts where the node exists.")
    verification: NodeVerification | None = Field(
        default=None, description="Exact-patching check; None when the node was not verified."
    )


class AttributionJobResult(BaseModel):
    """AtP / AtP* scores of an attribute job, top nodes first."""

    model_config = _STRICT
    kind: Literal["attribute"] = Field(default="attribute", description="Result kind.")
    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    method: str = Field(description="Estimator: atp or atpstar (QK fix + GradDrop).")
    n_prompts: int = Field(ge=0, description="Prompt pairs aggregated.")
    n_nodes: int = Field(ge=0, description="Distinct nodes scored.")
    n_verified: int = Field(ge=0, description="Top nodes checked by exact patching.")
    top: list[NodeEffect] = Field(
        description="Nodes of largest total ranking score over the prompt set (mean_abs × "
        "n_prompts), best first."
    )
    certification: CertificationResult | None = Field(
        default=None,
        description="Bound θ on the mean |effect| of every scored node not verified (the "
        "job's certify setting); None when not asked for.",
    )
    auto_verification: AutoVerification | None = Field(
        default=None,
        description="verify_top_k: auto: how many nodes were verified and what ended it "
        "(the bound, the budget, or every node verified); None otherwise.",
    )
    per_prompt_exact: PerPromptArray | None = Field(
        default=None,
        description="Per-prompt exact Δm of every verified node ([prompt, verified node] "
        "float32, NaN where the node is absent), stored beside the result; None when nothing "
        "was verified or the store predates it.",
    )

    @property
    def certified(self) -> str | None:
        """The certification in words (``no unverified node exceeds θ (95 %)``), if any."""
        return None if self.certification is None else self.certification.statement()

    @property
    def certificate(self) -> str | None:
        """The certification with its cost and the node that came closest, if any."""
        return None if self.certification is None else self.certification.summary_line()

    @property
    def verified_complete(self) -> str | None:
        """verify_top_k: auto in words (``top-20 complete at 95 %: …``), if it ran."""
        auto = self.auto_verification
        return None if auto is None else auto.statement()

    def rank_score(self, effect: NodeEffect) -> float:
        """The key ``top`` is sorted by, as a mean over all prompts (0 where the node is absent)."""
        return effect.mean_abs * effect.n_prompts / max(self.n_prompts, 1)


class FeatureDelta(BaseModel):
    """Exact effect of ablating one SAE feature, aggregated over prompts."""

    model_config = _STRICT
    site: str = Field(description="SAE site label.")
    feature: int = Field(ge=0, description="Feature id.")
    mean_delta: float = Field(
        description="Mean Δm over the prompts where it is defined (zero mode: every prompt)."
    )
    mean_abs_delta: float = Field(description="Mean |Δm| over the same prompts.")
    n_prompts: int = Field(ge=0, description="Prompts the mean is over.")
    n_active: int = Field(ge=0, description="Prompts where the feature was active and ablated.")
    estimate_mean: float | None = Field(
        default=None,
        description="Targeted scans: the cache's linear estimate of mean_delta (mean over the "
        "prompts of −Σ a·∂m/∂a at the positions); None in a full scan.",
    )
    estimate_mean_abs: float | None = Field(
        default=None,
        description="Targeted scans: the estimate of mean_abs_delta (mean of |−Σ a·∂m/∂a|), "
        "the key candidates were ordered by; None in a full scan.",
    )
    n_exact: int | None = Field(
        default=None,
        ge=0,
        description="Pair-level targeted scans: the feature's (prompt, feature) pairs ablated "
        "exactly; its other n_active − n_exact pairs enter mean_delta and mean_abs_delta as the "
        "cache's estimate. None: every value is exact (full and feature-level scans).",
    )


class AblationJobResult(BaseModel):
    """A feature-ablation scan: every active feature's exact Δm, largest mean |Δm| first."""

    model_config = _STRICT
    kind: Literal["ablation_scan"] = Field(default="ablation_scan", description="Result kind.")
    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    site: str = Field(description="SAE site label scanned.")
    mode: str = Field(description="Ablation value: zero, mean or resample.")
    n_prompts: int = Field(ge=0, description="Prompts scanned.")
    n_ablations: int = Field(ge=0, description="(prompt, feature) ablations run.")
    baseline_mean: float = Field(description="Mean clean metric over the prompts.")
    features: list[FeatureDelta] = Field(description="Every feature scanned, by mean |Δm|.")
    targeted: TargetedScan | None = Field(
        default=None,
        description="A targeted scan's candidates and stop (None: a full scan of every "
        "active feature).",
    )


class SpliceEvalJobResult(BaseModel):
    """Splice evaluation pooled over all shards."""

    model_config = _STRICT
    kind: Literal["splice_eval"] = Field(default="splice_eval", description="Result kind.")
    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    n_prompts: int = Field(ge=0, description="Prompts evaluated.")
    reference_prompts: int = Field(
        ge=1, description="Prompts the mean-ablation and mean-error references are taken over."
    )
    rows: list[SpliceEvalRow] = Field(description="clean, then each site set's variants.")


class DFAFeatureSummary(BaseModel):
    """One hook_z SAE feature's direct feature attribution, averaged over the prompts analysed.

    ``sum(head_means) + bias == mean_pre_activation`` and
    ``sum(source_means.values()) + bias == mean_pre_activation`` (exact per
    prompt, so exact on average).
    """

    model_config = _STRICT
    feature: int = Field(ge=0, description="SAE feature index.")
    n_prompts: int = Field(ge=1, description="Prompts on which the feature was decomposed.")
    mean_activation: float = Field(description="Mean feature activation at the destination.")
    mean_pre_activation: float = Field(description="Mean encoder pre-activation (SAE units).")
    bias: float = Field(description="The input-independent part b_enc − b_dec·W_enc (constant).")
    head_means: list[float] = Field(
        description="[head] mean over prompts of the head's total contribution (all sources)."
    )
    source_means: dict[str, float] = Field(
        description="Source role → mean over prompts of the contribution of that source "
        "position (all heads). Roles: the prompts' named positions (e.g. IO, S1, S2, END), "
        "'dest' (the destination itself), 'BOS' (position 0) and 'other'; a role a "
        "prompt lacks counts as 0 there."
    )


class DFAJobResult(BaseModel):
    """A DFA job: features at the destination position split by head and source role."""

    model_config = _STRICT
    kind: Literal["dfa"] = Field(default="dfa", description="Result kind.")
    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    site: str = Field(description="hook_z SAE site label.")
    position: str = Field(description="Destination position as the job named it.")
    n_prompts: int = Field(ge=0, description="Prompts analysed.")
    features: list[DFAFeatureSummary] = Field(
        description="Every feature decomposed, by total activation over the prompts (largest first)."
    )
    features_by: str | None = Field(
        default=None,
        description="How the features were chosen: by_attribution (|activation × gradient| "
        "of the metric), by_activation, given, or both rules joined by '+' when prompts "
        "differed (by_attribution where they carry the metric's labels); None in older stores.",
    )


JobResult = Annotated[
    AttributionJobResult | AblationJobResult | SpliceEvalJobResult | DFAJobResult,
    Field(discriminator="kind"),
]
