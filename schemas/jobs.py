"""Job specs: what a user submits (YAML or JSON), validated strictly.

A job names a model, its SAEs, a prompt source, a metric, a job kind with its
parameters, an output store and how to execute. ``circuitscan schema`` prints
the JSON Schema of :class:`JobSpec`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.schemas.node_kinds import (
    NodeKind,
    NodeKindSpelling,
    canonical_kinds,
    kinds_help,
    node_kind,
)

_STRICT = ConfigDict(frozen=True, extra="forbid")


# --- prompt sources ---------------------------------------------------------


def _without_empty_meta_columns(data: Any) -> Any:
    # Sources without meta_columns dump (and hash) exactly as before the field existed.
    if isinstance(data, dict) and not data.get("meta_columns"):
        data.pop("meta_columns", None)
    return data


class TextFileSource(BaseModel):
    """One prompt per non-empty line of a UTF-8 text file (no labels)."""

    model_config = _STRICT
    kind: Literal["text"] = Field(description="Source kind.")
    path: str = Field(description="Path to the text file.")


class JsonlSource(BaseModel):
    """One JSON object per line, a prompt record: ``text`` (required), ``answer`` and ``wrong``
    (one token each, leading space included), ``corrupted`` (scored with the clean prompt's
    answer and wrong tokens), ``template``, ``positions`` (named token indices, BOS at 0)
    and ``meta`` (string labels); see the README's prompt records."""

    model_config = _STRICT
    kind: Literal["jsonl"] = Field(description="Source kind.")
    path: str = Field(description="Path to the JSONL file.")
    meta_columns: list[str] | Literal["all"] = Field(
        default_factory=list,
        description="Top-level keys of a row beyond the record fields to keep as labels "
        "(stored as strings in the record's meta, so results break down by them: results "
        "--by KEY); 'all': every such key. Keys not listed are refused, so a misspelt field "
        "is not silently kept.",
    )

    @model_serializer(mode="wrap")
    def _drop_no_meta_columns(self, handler: Any) -> Any:
        return _without_empty_meta_columns(handler(self))


class DatasetSource(BaseModel):
    """A Hugging Face ``datasets`` dataset saved on disk with ``save_to_disk``."""

    model_config = _STRICT
    kind: Literal["dataset"] = Field(description="Source kind.")
    path: str = Field(description="Directory written by Dataset.save_to_disk.")
    split: str | None = Field(default=None, description="Split name when it is a DatasetDict.")
    text_column: str = Field(default="text", description="Column holding the prompt text.")
    answer_column: str | None = Field(default=None, description="Column with the answer token.")
    wrong_column: str | None = Field(default=None, description="Column with the wrong token.")
    corrupted_column: str | None = Field(
        default=None, description="Column with the corrupted text."
    )
    limit: int | None = Field(default=None, ge=1, description="Use only the first N rows.")
    meta_columns: list[str] | Literal["all"] = Field(
        default_factory=list,
        description="Further columns to keep as labels (stored as strings in each record's "
        "meta, so results break down by them: results --by COLUMN); 'all': every column "
        "that is not the text, answer, wrong or corrupted column.",
    )

    @model_serializer(mode="wrap")
    def _drop_no_meta_columns(self, handler: Any) -> Any:
        return _without_empty_meta_columns(handler(self))


class IOISource(BaseModel):
    """Generated indirect-object-identification prompts (ABBA/BABA, with ABC corruptions)."""

    model_config = _STRICT
    kind: Literal["ioi"] = Field(description="Source kind.")
    n: int = Field(ge=1, description="Number of prompts.")
    seed: int = Field(default=0, description="Generator seed.")
    templates: Literal["ABBA", "BABA", "mixed"] = Field(
        default="mixed", description="Which template family to draw from."
    )


class TemplateSource(BaseModel):
    """A generic template filler: ``{slot}`` placeholders filled from word lists.

    ``answer``/``wrong``/``corrupted`` are templates over the same slots, e.g.
    template "When {A} and {B} went to the {place}, {B} gave it to", answer " {A}".
    """

    model_config = _STRICT
    kind: Literal["template"] = Field(description="Source kind.")
    templates: list[str] = Field(min_length=1, description="Prompt templates with {slot}s.")
    fillers: dict[str, list[str]] = Field(description="Candidate words for each slot.")
    answer: str | None = Field(default=None, description="Answer template, e.g. ' {A}'.")
    wrong: str | None = Field(default=None, description="Wrong-answer template, e.g. ' {B}'.")
    corrupted: str | None = Field(
        default=None, description="Corrupted prompt template over the same slots."
    )
    distinct: list[list[str]] = Field(
        default_factory=list,
        description="Groups of slots that must get pairwise different words, e.g. [['A','B']].",
    )
    n: int = Field(ge=1, description="Number of prompts.")
    seed: int = Field(default=0, description="Sampling seed.")

    @model_validator(mode="after")
    def _slots_have_fillers(self) -> TemplateSource:
        import string

        used: set[str] = set()
        for text in [*self.templates, self.answer, self.wrong, self.corrupted]:
            if text:
                used |= {name for _, name, _, _ in string.Formatter().parse(text) if name}
        missing = sorted(used - set(self.fillers))
        if missing:
            raise ValueError(f"template slots without fillers: {missing}")
        empty = sorted(slot for slot, words in self.fillers.items() if not words)
        if empty:
            raise ValueError(f"fillers with no words: {empty}")
        return self


class StoreSource(BaseModel):
    """The prompts of a finished cache store, and the values it cached for them.

    An ``attribute`` job over a paired cache (``cache`` with ``paired: true``)
    computes AtP of every SAE feature and error node from the stored values
    alone; the model is loaded only to verify the top nodes.
    """

    model_config = _STRICT
    kind: Literal["store"] = Field(description="Source kind.")
    url: str = Field(
        description="The cache store: a local path, memory://NAME or s3://BUCKET/PREFIX."
    )


PromptSource = Annotated[
    TextFileSource | JsonlSource | DatasetSource | IOISource | TemplateSource | StoreSource,
    Field(discriminator="kind"),
]


# --- job kinds ----------------------------------------------------------------


class CacheParams(BaseModel):
    """Cache SAE feature activations (and gradients of the metric) into the store."""

    model_config = _STRICT
    needs_saes: ClassVar[bool] = True  # the kind runs on the job's SAEs
    kind: Literal["cache"] = Field(description="Job kind.")
    top_k: int | None = Field(
        default=None,
        ge=1,
        description="Keep only the top-k features per token (None: all).",
    )
    gradients: bool = Field(default=True, description="Store ∂metric/∂activation per entry.")
    value_dtype: Literal["float16", "bfloat16"] = Field(
        default="float16", description="On-disk dtype of activations and gradients."
    )
    examples_per_feature: int = Field(
        default=32, ge=1, le=1024, description="Size of each feature's top-examples index."
    )
    paired: bool = Field(
        default=False,
        description="Also run each prompt's corrupted text (forward only) and store its sparse "
        "activations at the paired positions, their clean-point gradients and the SAE error "
        "node's AtP term per token, so attribute jobs can read AtP from the store "
        "(docs/paired_caches.md). Needs gradients and a corrupted text for every prompt.",
    )
    align: Literal["same", "end"] = Field(
        default="same",
        description="paired: how clean and corrupted positions pair, as in attribute jobs "
        "('same': equal token lengths; 'end': counted from the last token, BOS with BOS).",
    )

    @model_validator(mode="after")
    def _paired_needs_gradients(self) -> CacheParams:
        if self.paired and not self.gradients:
            raise ValueError("paired caches store AtP terms, which need gradients: true")
        if self.align != "same" and not self.paired:
            raise ValueError("align pairs clean and corrupted positions, so it needs paired: true")
        return self

    @model_serializer(mode="wrap")
    def _drop_unpaired(self, handler: Any) -> Any:
        # Plain cache specs dump (and hash) exactly as before pairing existed.
        data = handler(self)
        if isinstance(data, dict) and not data.get("paired"):
            data.pop("paired", None)
            data.pop("align", None)
        return data


class CertifyParams(BaseModel):
    """Certified verification: a bound θ on every node the verification did not patch."""

    model_config = _STRICT
    samples: int = Field(ge=2, description="Random subsets of the unverified nodes patched (S).")
    confidence: float = Field(
        default=0.95, gt=0, lt=1, description="Confidence 1 − δ of the bound θ."
    )
    p: float = Field(
        default=0.25, gt=0, lt=1, description="Probability that a subset includes each node."
    )
    seed: int = Field(default=0, description="Seed of the subset draws.")
    top_k: int | None = Field(
        default=None,
        ge=1,
        description="verify_top_k: auto: the top-K to make complete (default 20): verify in "
        "estimate order until θ is below the smallest exact |effect| in the verified top-K.",
    )
    budget: int | None = Field(
        default=None,
        ge=1,
        description="verify_top_k: auto: the most nodes verified (default 5 × top_k).",
    )

    @model_serializer(mode="wrap")
    def _drop_unset_auto(self, handler: Any) -> Any:
        # Certify settings without the auto fields dump (and hash) as before they existed.
        data = handler(self)
        if isinstance(data, dict):
            for name in ("top_k", "budget"):
                if data.get(name) is None:
                    data.pop(name, None)
        return data


class AttributeParams(BaseModel):
    """Attribution patching (AtP or AtP*) over clean/corrupted pairs."""

    model_config = _STRICT
    needs_saes: ClassVar[bool] = False  # only its SAE node kinds need SAEs (checked below)
    kind: Literal["attribute"] = Field(description="Job kind.")
    method: Literal["atp", "atpstar", "atp2", "atpstar2"] = Field(
        default="atpstar",
        description="Estimator: atp, atpstar (QK fix + GradDrop), or either with the "
        "second-order (Hessian-vector product) term: atp2, atpstar2.",
    )
    # Kept as written (the spec hash covers it, so older specs keep resuming their stores);
    # code reads the kind names through ``node_kinds``.
    nodes: list[NodeKindSpelling] = Field(
        default_factory=lambda: list[NodeKindSpelling](["sae_feature", "head_z"]),
        min_length=1,
        description=f"Node kinds to score: {kinds_help()}.",
    )
    positions: Literal["all", "last"] | list[str] = Field(
        default="all",
        description="Positions to score: all, last, or named positions (IOI: IO, S1, S2, END).",
    )
    verify_top_k: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        default=0,
        description="Verify this many top nodes by exact patching (0: off), or auto: verify "
        "in estimate order until certify's bound shows the top-K complete (needs certify).",
    )
    top_nodes: int = Field(
        default=50, ge=1, description="How many top nodes (by mean |effect|) the job result keeps."
    )
    certify: CertifyParams | None = Field(
        default=None,
        description="After verifying the top nodes, bound the effect of every other scored "
        "node by patching random subsets of them (needs verify_top_k ≥ 1); None: off.",
    )
    align: Literal["same", "end"] = Field(
        default="same",
        description=(
            "How clean and corrupted positions pair: 'same' (equal token lengths, one to one) "
            "or 'end' (counted from the last token, BOS with BOS), for corruptions that "
            "change the length early in the prompt; unpaired positions are not patched."
        ),
    )

    @property
    def node_kinds(self) -> list[NodeKind]:
        """The node kinds to score, by name (aliases resolved, repeats dropped)."""
        return canonical_kinds(list(self.nodes))

    @model_validator(mode="after")
    def _certify_after_verification(self) -> AttributeParams:
        if self.verify_top_k == "auto":
            if self.certify is None:
                raise ValueError(
                    "verify_top_k: auto stops when certify's bound shows the top-K complete, "
                    "so it needs certify: {samples: S}"
                )
            top_k, budget = self.certify.top_k or 20, self.certify.budget
            if budget is not None and budget < top_k:
                raise ValueError(f"certify.budget ({budget}) is below certify.top_k ({top_k})")
            return self
        if self.certify is not None and self.verify_top_k < 1:
            raise ValueError(
                "certify bounds the nodes left unverified, so it needs verify_top_k ≥ 1"
            )
        if self.certify is not None and (self.certify.top_k or self.certify.budget):
            raise ValueError("certify.top_k and certify.budget apply to verify_top_k: auto only")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_certify(self, handler: Any) -> Any:
        # Specs without certify dump (and hash) exactly as before the field existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("certify") is None:
            data.pop("certify", None)
        return data


class ScanCandidates(BaseModel):
    """A targeted scan's candidates: features in the order of a cache store's linear estimate.

    Each feature's zero-ablation estimate is ``−a·∂m/∂a`` summed over the cache's
    entries at the scan's positions, prompt by prompt (corrupted mode: the AtP
    term ``(a′ − a)·∂m/∂a`` of a paired cache); candidates are ablated
    exactly, largest estimated mean |Δm| first, until the exact top-K has not
    changed for ``patience`` further candidates or ``budget`` candidates are spent.
    """

    model_config = _STRICT
    store: str = Field(
        description="A cache store with gradients of the job's metric over the job's prompts "
        "(same model, SAE and prompts, in order)."
    )
    top_k: int = Field(default=10, ge=1, description="Size of the exact top-K (by mean |Δm|).")
    patience: int = Field(
        default=20,
        ge=1,
        description="Stop when the exact top-K has not changed for this many further candidates.",
    )
    budget: int | None = Field(
        default=None, ge=1, description="Stop after this many candidates at most (None: no cap)."
    )
    round_size: int = Field(
        default=8,
        ge=1,
        description="Candidates ablated per round (one pass of the actors over every prompt).",
    )
    gap: float | Literal["auto"] | None = Field(
        default=None,
        description="Also stop once the exact K-th largest mean |Δm| is at least gap × the "
        "next candidate's estimated mean |Δm| (candidates are in estimate order, so no later "
        "one is expected to enter the top-K); 'auto': gap = the largest exact / estimated "
        "ratio among the candidates ablated so far. None: patience and budget only.",
    )
    granularity: Literal["feature", "pair"] = Field(
        default="feature",
        description="feature: a candidate is a feature, ablated on every prompt where it is "
        "active, so every reported value is exact; pair: a candidate is one (prompt, feature) "
        "pair (largest |estimate| of that prompt alone first, among the features whose rank is "
        "still in doubt), and a feature's reported mean "
        "is its ablated pairs' exact Δm plus its other pairs' estimates (FeatureDelta.n_exact "
        "says how many are exact); patience, budget and round_size then count pairs, and it "
        "stops once patience holds and the gap bound says no estimated pair left can reorder "
        "the top-K, so it needs gap (docs/paired_caches.md).",
    )

    @field_validator("gap")
    @classmethod
    def _positive_gap(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and not value > 0:
            raise ValueError(f"gap must be positive (or 'auto'), got {value}")
        return value

    @model_validator(mode="after")
    def _pairs_need_a_bound(self) -> ScanCandidates:
        if self.granularity == "pair" and self.gap is None:
            raise ValueError(
                "granularity: pair needs gap (auto or a number): a pair-level scan stops only "
                "once patience holds and the estimated pairs left cannot reorder the top-K"
            )
        if self.granularity == "pair" and isinstance(self.gap, float | int) and self.gap < 1:
            raise ValueError(
                f"granularity: pair takes an estimated pair's |Δm| to lie within [1/gap, gap] × "
                f"its |estimate|, so gap must be at least 1 (or 'auto'), got {self.gap}"
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_gap(self, handler: Any) -> Any:
        # Candidates without the gap rule dump (and hash) exactly as before it existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("gap") is None:
            data.pop("gap", None)
        if isinstance(data, dict) and data.get("granularity") == "feature":
            data.pop("granularity", None)  # and feature-level ones as before pairs existed
        return data


class AblationScanParams(BaseModel):
    """Exhaustive ablation of every SAE feature active at the chosen positions."""

    model_config = _STRICT
    needs_saes: ClassVar[bool] = True  # the kind runs on the job's SAEs
    kind: Literal["ablation_scan"] = Field(description="Job kind.")
    site: str | None = Field(
        default=None, description="SAE site label (e.g. L15.resid_post); default: the first SAE."
    )
    mode: Literal["zero", "mean", "resample", "corrupted"] = Field(
        default="zero",
        description="Ablation value; corrupted: each feature patched to its activation on the "
        "prompt's corrupted text at the paired position (every prompt needs a corrupted text).",
    )
    align: Literal["same", "end"] = Field(
        default="same",
        description="corrupted mode: how clean and corrupted positions pair, as in attribute "
        "jobs ('same': equal token lengths; 'end': counted from the last token, BOS with BOS).",
    )
    positions: Literal["all", "last"] | list[str] = Field(
        default="last", description="Positions whose active features are ablated."
    )
    batch_size: int = Field(default=32, ge=1, description="Ablations per forward pass.")
    reference_prompts: int = Field(
        default=64,
        ge=1,
        description=(
            "mean/resample modes: the job's first N prompts give the values features are "
            "set to (their activations at the chosen positions), the same for every shard."
        ),
    )
    candidates: ScanCandidates | None = Field(
        default=None,
        description="Targeted scan: ablate features in the order a cache store estimates "
        "their effect, stopping early (zero mode: −a·∂m/∂a from any cache with gradients; "
        "corrupted mode: the AtP term (a′ − a)·∂m/∂a from a paired cache); None: every "
        "active feature.",
    )

    @model_validator(mode="after")
    def _candidates_zero_mode(self) -> AblationScanParams:
        if self.candidates is not None and self.mode not in ("zero", "corrupted"):
            raise ValueError(
                "candidates rank features by the cache's linear estimate (zero: −a·∂m/∂a, "
                "corrupted: (a′ − a)·∂m/∂a), so a targeted scan needs mode: zero or "
                f"corrupted (got {self.mode!r})"
            )
        if self.align != "same" and self.mode != "corrupted":
            raise ValueError(
                "align pairs clean and corrupted positions, so it needs mode: corrupted"
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_candidates(self, handler: Any) -> Any:
        # Full scans dump (and hash) exactly as before targeted scans existed, and
        # scans other than corrupted ones as before align existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("candidates") is None:
            data.pop("candidates", None)
        if isinstance(data, dict) and data.get("mode") != "corrupted":
            data.pop("align", None)
        return data


class SpliceEvalParams(BaseModel):
    """Splice SAEs in without their error term and measure metric and KL."""

    model_config = _STRICT
    needs_saes: ClassVar[bool] = True  # the kind runs on the job's SAEs
    kind: Literal["splice_eval"] = Field(description="Job kind.")
    layer_sets: list[list[str]] = Field(
        default_factory=list,
        description="Sets of SAE site labels spliced together (each SAE alone is always included).",
    )
    reference_prompts: int = Field(
        default=64,
        ge=1,
        description="The job's first N prompts give the mean-ablation and mean-error references.",
    )


class DFAParams(BaseModel):
    """Direct feature attribution of attention-output (hook_z) SAE features on every prompt.

    Each chosen feature's encoder pre-activation at the destination position is
    split exactly into per-head, per-source-position terms (patterns and norm
    scales frozen) plus a constant; the job result averages them over prompts.
    """

    model_config = _STRICT
    needs_saes: ClassVar[bool] = True  # the kind runs on the job's SAEs
    kind: Literal["dfa"] = Field(description="Job kind.")
    site: str | None = Field(
        default=None,
        description="hook_z SAE site label (e.g. L15.z); default: the job's first hook_z SAE.",
    )
    position: Literal["last"] | int | str = Field(
        default="last",
        description="Destination position: 'last' real token, a 0-based index (BOS is 0), "
        "or a named position of the prompts (IOI: IO, S1, S2, END).",
    )
    features: list[int] | Literal["by_attribution", "by_activation"] | None = Field(
        default=None,
        description="Features decomposed on every prompt: a list of ids; by_attribution: each "
        "prompt's top_features features of largest |activation × ∂metric/∂activation| at the "
        "position (attribution to the job's metric, SAEs spliced with their error terms); "
        "by_activation: its top_features most active ones. Default: by_attribution on prompts "
        "that carry the metric's labels (answer, and wrong for logit_diff), by_activation on "
        "the others.",
    )
    top_features: int = Field(
        default=4, ge=1, le=256, description="Features per prompt when 'features' is not a list."
    )

    @model_validator(mode="after")
    def _check(self) -> DFAParams:
        if self.site is not None and HookSite.parse(self.site).point != "z":
            raise ValueError(f"dfa site {self.site!r} is not an attention-output (z) site")
        if isinstance(self.position, int) and self.position < 0:
            raise ValueError(f"dfa position must be 0 or more, got {self.position}")
        if isinstance(self.features, list):
            if not self.features:
                raise ValueError("dfa 'features' is empty: give feature ids or leave it out")
            bad = [f for f in self.features if f < 0]
            if bad or len(set(self.features)) != len(self.features):
                raise ValueError(f"dfa 'features' must be distinct ids >= 0, got {self.features}")
        return self


JobParams = Annotated[
    CacheParams | AttributeParams | AblationScanParams | SpliceEvalParams | DFAParams,
    Field(discriminator="kind"),
]


# --- execution ----------------------------------------------------------------


class ExecutionSpec(BaseModel):
    """How a job runs on Ray."""

    model_config = _STRICT
    num_actors: int | Literal["auto"] = Field(
        default="auto", description="Worker actors: 'auto' = one per GPU, else one per CPU."
    )
    torch_threads: int = Field(default=1, ge=1, description="torch threads per CPU actor.")
    batch_size: int = Field(default=8, ge=1, description="Prompts per forward pass.")
    batch_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Padded tokens per forward pass at most (prompts x longest prompt after "
        "the token cap), so a batch's memory is bounded by tokens, not by the prompt count: "
        "batches of short prompts fill up to batch_size, long ones hold fewer (a prompt "
        "longer than the budget runs alone). None: batch_size prompts per pass. Cache jobs.",
    )
    max_in_flight_per_actor: int = Field(
        default=2, ge=1, le=16, description="Shards queued per actor (backpressure bound)."
    )
    max_retries: int = Field(default=3, ge=0, description="Retries of a shard whose actor died.")


class JobSpec(BaseModel):
    """A whole scan job."""

    model_config = _STRICT
    name: str = Field(default="job", min_length=1, description="Human-readable job name.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model to load.")
    saes: list[SAESpec] = Field(default_factory=list, description="SAEs to splice in.")
    prompts: PromptSource = Field(description="Where the prompts come from.")
    metric: MetricSpec = Field(default_factory=MetricSpec, description="The metric m(x).")
    job: JobParams = Field(description="Job kind and its parameters.")
    store: str = Field(
        description="Output store: a local path, memory://NAME or s3://BUCKET/PREFIX."
    )
    shard_size: int = Field(default=64, ge=1, description="Prompts per shard.")
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=2,
        description="Token cap per prompt (BOS included); None: the model's context.",
    )
    overlong: Literal["reject", "truncate"] = Field(
        default="reject",
        description="What to do with prompts longer than the cap: skip them or cut them (left-truncate keeps the end).",
    )
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec, description="Ray execution.")

    @model_validator(mode="after")
    def _kind_needs(self) -> JobSpec:
        if self.job.needs_saes and not self.saes:
            raise ValueError(f"job kind '{self.job.kind}' needs at least one SAE in 'saes'")
        if isinstance(self.job, AttributeParams) and not self.saes:
            sae_kinds = sorted({n for n in self.job.nodes if node_kind(n).sae})
            if sae_kinds:
                raise ValueError(f"attribute nodes {sae_kinds} need at least one SAE in 'saes'")
        return self

    def content_hash(self) -> str:
        """Hash of what the job computes (name, store location and execution settings excluded)."""
        payload = self.model_dump(mode="json", exclude={"execution", "name", "store"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
