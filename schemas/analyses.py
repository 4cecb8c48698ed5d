"""Results of the circuit analyses: splice evaluation, head→feature→logit, DFA, QK pairs,
and the patch path of nodes an attribution estimate gets wrong.

Plain JSON-serialisable pydantic models, so the store and the report writer
can keep and render them without torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.metrics import MetricSpec

SpliceVariant = Literal["clean", "spliced", "error_mean", "mean_ablation"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpliceEvalRow(_Frozen):
    """One variant of one set of spliced sites, averaged over a prompt set."""

    sites: list[str] = Field(description="Labels of the sites intervened on (e.g. ['L6.z']).")
    variant: SpliceVariant = Field(
        description="clean: no intervention; spliced: activation replaced by the "
        "SAE reconstruction (error term zeroed); error_mean: reconstruction plus the mean error "
        "over the reference prompts; mean_ablation: activation replaced by its reference mean."
    )
    n_prompts: int = Field(ge=0, description="Prompts averaged over.")
    metric_mean: float = Field(description="Mean task metric (e.g. logit difference, logits).")
    metric_std: float = Field(description="Standard deviation of the metric over prompts.")
    kl_metric_pos: float = Field(
        description="Mean KL(original ‖ variant) of the next-token distribution at the metric "
        "position, in nats."
    )
    kl_all_pos: float | None = Field(
        default=None,
        description="Mean KL(original ‖ variant) over all real token positions, in nats.",
    )
    metric_recovered: float | None = Field(
        default=None,
        description="(metric − mean-ablation metric) / (clean − mean-ablation metric) for the "
        "same sites; 1 = SAE keeps the behaviour, 0 = as bad as mean ablation.",
    )


class TokenEffect(_Frozen):
    """A vocabulary entry and the logit change a head writes to it."""

    token_id: int = Field(description="Vocabulary index.")
    token: str | None = Field(default=None, description="Decoded token, when a tokenizer is known.")
    logit: float = Field(description="Direct logit contribution per unit feature, in logits.")


class HeadLogitEffect(_Frozen):
    """One attention head's direct effect on the answer logits through one feature direction."""

    layer: int = Field(ge=0, description="Layer of the head.")
    head: int = Field(ge=0, description="Query-head index.")
    logit_diff: float = Field(
        description="logit[answer] − logit[wrong] written by the head per unit of the feature "
        "(decoder row scaled by 1), patterns and norm scales frozen, in logits."
    )
    top_tokens: list[TokenEffect] = Field(description="Tokens the head pushes up most.")
    bottom_tokens: list[TokenEffect] = Field(description="Tokens the head pushes down most.")
    attention: float | None = Field(
        default=None,
        description="The head's attention weight from the destination to the source position "
        "on the analysed prompt (None: not computed).",
    )
    contribution: float | None = Field(
        default=None,
        description="The prompt's actual direct effect through this head: feature activation × "
        "attention × logit_diff, i.e. the change in logit[answer] − logit[wrong] when the "
        "feature is removed from what this head reads at the source, patterns and norm scales "
        "frozen (logits; None: not computed).",
    )


class HeadFeatureLogitResult(_Frozen):
    """Head→feature→logit for one SAE feature: every downstream head, ranked."""

    sae_site: str = Field(description="Label of the SAE's hook site.")
    feature: int = Field(ge=0, description="SAE feature index.")
    answer_id: int = Field(description="Answer token id.")
    wrong_id: int = Field(description="Wrong-answer token id.")
    heads: list[HeadLogitEffect] = Field(description="Heads sorted by |logit_diff|, largest first.")

    def by_contribution(self) -> list[HeadLogitEffect]:
        """The heads ranked by |contribution| (the prompt's own ranking), largest first."""
        known = [h for h in self.heads if h.contribution is not None]
        return sorted(known, key=lambda h: -abs(h.contribution or 0.0))


class DFAResult(_Frozen):
    """An attention-output (hook_z) SAE feature's pre-activation split by head and source."""

    site: str = Field(description="Label of the hook_z SAE site.")
    feature: int = Field(ge=0, description="SAE feature index.")
    dest_pos: int = Field(ge=0, description="Destination token position.")
    pre_activation: float = Field(description="The feature's encoder pre-activation.")
    activation: float = Field(description="The feature's activation (after the nonlinearity).")
    contributions: list[list[float]] = Field(
        description="[head][source position] contributions A^h_{s,t} v^h_t·W_enc[h,:,i]; "
        "sources past dest_pos are zero."
    )
    bias: float = Field(description="b_enc[i] − b_dec·W_enc[:, i] (the input-independent part).")
    tokens: list[str] | None = Field(default=None, description="Decoded tokens, when known.")


DFANodeKind = Literal[
    "attn_feature",
    "head_source",
    "resid_feature",
    "sae_error",
    "sae_bias",
    "bias",
    "embed",
    "pos_embed",
    "attn_out",
    "mlp_out",
    "other",
]


class DFANode(_Frozen):
    """A node of a recursive DFA tree. Children's values sum exactly to the node's value."""

    kind: DFANodeKind = Field(description="What this node is.")
    label: str = Field(description="Human-readable label, e.g. 'L3.z#12@7' or 'L2H1 7→4'.")
    value: float = Field(description="Contribution to the parent (the root: its pre-activation).")
    layer: int | None = Field(default=None, description="Layer of the component, when any.")
    position: int | None = Field(default=None, description="Token position, when any.")
    head: int | None = Field(default=None, description="Attention head, when any.")
    feature: int | None = Field(default=None, description="SAE feature index, when any.")
    site: str | None = Field(default=None, description="SAE site label, when any.")
    children: list[DFANode] = Field(
        default_factory=list, description="Decomposition of value (empty for a leaf)."
    )


class QKPairTable(_Frozen):
    """Attention score of one head from dest to source split into (query, key) component pairs."""

    layer: int = Field(ge=0, description="Layer of the head.")
    head: int = Field(ge=0, description="Query-head index.")
    dest_pos: int = Field(ge=0, description="Query (destination) position.")
    src_pos: int = Field(ge=0, description="Key (source) position.")
    score: float = Field(description="q·k / attn_scale before masking and softmax.")
    query_labels: list[str] = Field(
        description="Query-side components: active features ('f12'), 'error', 'b_dec', 'bias'."
    )
    key_labels: list[str] = Field(description="Key-side components, same naming.")
    table: list[list[float]] = Field(
        description="[query component][key component] contribution; the whole table sums to score."
    )


class QKVarianceExplained(_Frozen):
    """How much of a head's score variance over prompts the top feature pairs explain."""

    layer: int = Field(ge=0, description="Layer of the head.")
    head: int = Field(ge=0, description="Query-head index.")
    n_prompts: int = Field(ge=0, description="Prompts in the set.")
    top_pairs: list[tuple[str, str, float]] = Field(
        description="(query label, key label, mean contribution) of the pairs used, largest "
        "variance share first."
    )
    variance_share: list[float] = Field(
        description="Per pair, Cov(pair contribution, score)/Var(score); over all pairs these "
        "sum to 1."
    )
    fraction_explained: list[float] = Field(
        description="1 − Var(score − Σ top-n pairs)/Var(score) for n = 1..len(top_pairs)."
    )


PerPrompt = list[float]  # one value per prompt (every node exists in every prompt)


class PatchPathNode(_Frozen):
    """One node's exact, frozen-pattern and partial patches beside its estimates."""

    node: str = Field(description="The node (see circuitscan.schemas.attribution.Node).")
    exact: PerPrompt = Field(description="Δm of the full patch, metric units, per prompt.")
    frozen_later_patterns: PerPrompt = Field(
        description="Δm of the full patch with every later block's attention pattern frozen "
        "at its clean value, per prompt."
    )
    partial: list[PerPrompt] = Field(
        description="Δm/f of the patch taken a fraction f of the way, per fraction (in the "
        "output's order) and prompt; tends to AtP's derivative as f → 0."
    )
    estimates: dict[str, PerPrompt] = Field(
        description="Signed estimate per method (atp, atpstar: QK-fixed), per prompt."
    )
    ranking_scores: dict[str, PerPrompt] = Field(
        description="What each method ranks by, per prompt (AtP*: GradDrop's magnitude)."
    )
    mean_abs_exact: float = Field(description="Mean |exact Δm| over prompts.")
    mean_abs_frozen: float = Field(description="Mean |Δm| with later patterns frozen.")
    sign_changes: int = Field(
        ge=0,
        description="Prompts where Δm/f at the smallest fraction and the full Δm differ in "
        "sign: no first-order estimate at the clean point gets these right.",
    )


class AnalysisContext(_Frozen):
    """What an analysis ran on: enough to rerun it."""

    model: str = Field(description="Model name or source.")
    saes: list[str] = Field(description="SAE names/sources, with their site labels.")
    task: str = Field(description="Prompt task: 'ioi', or the prompt source's kind (jsonl, ...).")
    n_prompts: int = Field(ge=0, description="Prompts the analysis ran on.")
    seed: int = Field(description="Prompt generator seed (0 for files and datasets).")
    source: str | None = Field(
        default=None,
        description="The prompt source as a job spec's prompts (JSON); None: generated IOI.",
    )
    metric: MetricSpec | None = Field(
        default=None, description="The metric, when not the default logit difference at last."
    )


class SpliceEvalOutput(_Frozen):
    """Splice evaluation of one or more SAEs over a prompt set (method 7)."""

    kind: Literal["splice_eval"] = Field(default="splice_eval", description="Output kind.")
    context: AnalysisContext = Field(description="Model, SAEs and prompts.")
    reference: str = Field(description="The prompt distribution the means are taken over.")
    reference_prompts: int = Field(ge=1, description="Reference prompts averaged over.")
    rows: list[SpliceEvalRow] = Field(description="clean, then each site set's variants.")


class HeadFeatureLogitOutput(_Frozen):
    """Head→feature→logit for one feature, with where its scales were frozen (method 8)."""

    kind: Literal["head_feature_logit"] = Field(
        default="head_feature_logit", description="Output kind."
    )
    context: AnalysisContext = Field(description="Model, SAEs and prompts.")
    prompt_index: int = Field(ge=0, description="Prompt whose forward pass froze the norm scales.")
    src_pos: int = Field(ge=0, description="Source position the feature sits at.")
    dest_pos: int = Field(ge=0, description="Destination (answer-predicting) position.")
    answer: str | None = Field(default=None, description="Answer token text (e.g. ' Mary').")
    wrong: str | None = Field(default=None, description="Wrong-answer token text.")
    feature_activation: float = Field(description="The feature's activation at src_pos.")
    feature_attribution: float = Field(
        description="activation · (decoder row · ∂metric/∂x) at src_pos, in metric units."
    )
    result: HeadFeatureLogitResult = Field(description="Every downstream head, ranked.")


class DFAOutput(_Frozen):
    """DFA and recursive DFA of one attention-output SAE feature on one prompt (method 9)."""

    kind: Literal["dfa"] = Field(default="dfa", description="Output kind.")
    context: AnalysisContext = Field(description="Model, SAEs and prompts.")
    prompt_index: int = Field(ge=0, description="Prompt analysed.")
    text: str = Field(description="The prompt's text.")
    feature_attribution: float = Field(
        description="activation · (decoder row · ∂metric/∂z) at dest_pos, in metric units."
    )
    pruning: dict[str, float] = Field(description="max_depth, top_k, min_abs, min_frac used.")
    result: DFAResult = Field(description="Head × source decomposition of the pre-activation.")
    tree: DFANode = Field(description="Recursive decomposition; children sum to parents.")
    max_sum_error: float = Field(ge=0, description="Largest |node − Σ children| in the tree.")


class QKPairsOutput(_Frozen):
    """QK feature pairs of one head over a prompt set (method 10)."""

    kind: Literal["qk_pairs"] = Field(default="qk_pairs", description="Output kind.")
    context: AnalysisContext = Field(description="Model, SAEs and prompts.")
    dest: str = Field(description="Named destination position (e.g. 'END').")
    src: str = Field(description="Named source position (e.g. 'IO').")
    mean_attention: float = Field(description="The head's mean attention weight dest→src.")
    tables: list[QKPairTable] = Field(description="One pair table per prompt.")
    variance: QKVarianceExplained = Field(description="Variance explained by the top pairs.")


class PatchPathOutput(_Frozen):
    """Why estimates and exact patching disagree on some nodes, over a prompt set."""

    kind: Literal["patch_path"] = Field(default="patch_path", description="Output kind.")
    context: AnalysisContext = Field(description="Model, SAEs and prompts.")
    corruption: str = Field(description="What the corrupted prompts are (e.g. IOI's ABC).")
    fractions: list[float] = Field(description="Partial-patch fractions, increasing.")
    nodes: list[PatchPathNode] = Field(description="One entry per node asked for.")


AnalysisOutput = Annotated[
    SpliceEvalOutput | HeadFeatureLogitOutput | DFAOutput | QKPairsOutput | PatchPathOutput,
    Field(discriminator="kind"),
]
"""Any analysis output, told apart by its ``kind`` (how a store reads one back)."""
