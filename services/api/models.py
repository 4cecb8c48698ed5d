"""Request and response bodies of the HTTP API (store query results reuse schemas/store.py)."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ActiveFeatures, FeatureExample, StoreLayout

_STRICT = ConfigDict(frozen=True, extra="forbid")

Item = TypeVar("Item")


class Page(BaseModel, Generic[Item]):
    """One page of a listing."""

    model_config = _STRICT
    items: list[Item] = Field(description="The items of this page, in listing order.")
    offset: int = Field(description="Index of the first item of this page in the whole listing.")
    limit: int = Field(description="Page size asked for (at most the server's maximum).")
    total: int = Field(description="Items in the whole listing.")


class Health(BaseModel):
    """Liveness of the API."""

    model_config = _STRICT
    status: Literal["ok"] = Field(description="Always 'ok' when the API answers.")
    version: str = Field(description="Installed circuitscan version.")
    jobs_enabled: bool = Field(description="Whether a Ray job server is configured.")


# --- stores ---------------------------------------------------------------------------


class StoreSummary(BaseModel):
    """One store in the store listing."""

    model_config = _STRICT
    name: str = Field(description="Store name (its folder under the store root).")
    sites: list[str] = Field(description="Site labels the store holds.")
    job_name: str | None = Field(description="Name of the job that wrote it, when recorded.")
    job_kind: str | None = Field(description="Kind of that job, when recorded.")
    shards_committed: int = Field(description="Committed (visible) shards.")
    n_prompts: int = Field(description="One past the highest committed prompt index.")
    n_tokens: int = Field(description="Tokens stored over all committed shards.")
    damaged_shards: list[int] = Field(
        default_factory=list,
        description="Shards whose manifest entry is damaged (`circuitscan repair` recomputes them).",
    )


class DamagedStore(BaseModel):
    """A store under the root that cannot be opened: its layout document is damaged."""

    model_config = _STRICT
    name: str = Field(description="Store name (its folder under the store root).")
    reason: str = Field(description="What is damaged, naming the object.")


class StorePage(Page[StoreSummary]):
    """One page of the store listing; stores of the page that cannot be opened are apart."""

    damaged: list[DamagedStore] = Field(
        default_factory=list, description="Stores of this page that cannot be opened, and why."
    )


class StoreInfo(BaseModel):
    """A store's metadata."""

    model_config = _STRICT
    name: str = Field(description="Store name.")
    layout: StoreLayout = Field(description="The store's layout (sites, dtypes, job spec...).")
    shard_ids: list[int] = Field(description="Ids of the committed shards, ascending.")
    n_prompts: int = Field(description="One past the highest committed prompt index.")
    n_tokens: int = Field(description="Tokens stored over all committed shards.")
    tokens_decoded: bool = Field(
        description="Whether the model's tokenizer is available to decode token ids to text."
    )


class PromptSummary(BaseModel):
    """One prompt in a prompt listing."""

    model_config = _STRICT
    prompt: int = Field(description="Global prompt index.")
    text: str = Field(description="Prompt text (without BOS).")
    n_tokens: int = Field(description="Stored tokens of the prompt (BOS included).")
    answer: str | None = Field(description="Answer token text, when labelled.")
    wrong: str | None = Field(description="Wrong-answer token text, when labelled.")


class PromptDetail(BaseModel):
    """One prompt with its tokens."""

    model_config = _STRICT
    prompt: int = Field(description="Global prompt index.")
    record: PromptRecord = Field(description="The prompt and its labels as the job saw them.")
    token_ids: list[int] = Field(description="Stored token ids, BOS first.")
    tokens: list[str] | None = Field(description="Decoded tokens (None without a tokenizer).")


class FeaturesAt(BaseModel):
    """The features active at one (prompt, position)."""

    model_config = _STRICT
    token: str | None = Field(description="The decoded token at that position.")
    features: ActiveFeatures = Field(description="Active features, sorted.")


class PromptFeatures(BaseModel):
    """The active features at every position of one prompt."""

    model_config = _STRICT
    site: str = Field(description="Site label.")
    prompt: int = Field(description="Global prompt index.")
    text: str = Field(description="Prompt text (without BOS).")
    tokens: list[str] | None = Field(description="Decoded tokens (None without a tokenizer).")
    positions: list[ActiveFeatures] = Field(description="One entry per token position, in order.")


class FeatureExamples(BaseModel):
    """The top-activating examples of one feature."""

    model_config = _STRICT
    site: str = Field(description="Site label.")
    feature: int = Field(description="Feature id.")
    examples: list[FeatureExample] = Field(description="Examples, strongest first.")


SummaryOrder = Literal["feature", "count", "max", "total"]


# --- jobs -------------------------------------------------------------------------------


class JobSubmission(BaseModel):
    """A job to run on the Ray cluster."""

    model_config = _STRICT
    spec: JobSpec = Field(
        description=(
            "The job spec. Its 'store' must be a store NAME (one path segment); the job "
            "writes the store of that name under the server's store root."
        )
    )


class JobSubmitted(BaseModel):
    """The answer to a job submission."""

    model_config = _STRICT
    job_id: str = Field(description="Ray submission id of the job.")
    store: str = Field(description="Name of the store the job writes.")


class JobProgress(BaseModel):
    """How far a job has got, read from its store's commit manifest."""

    model_config = _STRICT
    shards_committed: int = Field(description="Shards of this job committed in its store.")
    shards_planned: int | None = Field(
        description=(
            "Shards the spec's prompt count implies (an upper bound: prompts over the token "
            "cap are dropped later); None when the prompt source has no fixed count."
        )
    )
    prompts_committed: int = Field(description="Prompts in the committed shards.")
    tokens_committed: int = Field(description="Tokens in the committed shards.")
    fraction: float | None = Field(
        description="shards_committed / shards_planned (1 once the job succeeded); None if unknown."
    )


class JobStatus(BaseModel):
    """A submitted job as Ray and its store know it."""

    model_config = _STRICT
    job_id: str = Field(description="Ray submission id.")
    status: str = Field(description="Ray job status: PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED.")
    message: str | None = Field(description="Ray's status message.")
    name: str | None = Field(description="Job name from its spec.")
    kind: str | None = Field(description="Job kind from its spec.")
    store: str | None = Field(description="Name of its store (None when outside the store root).")
    start_time: float | None = Field(description="Start time (Unix seconds).")
    end_time: float | None = Field(description="End time (Unix seconds), None while running.")
    progress: JobProgress | None = Field(
        description="Progress from the store; None when the store is not readable here."
    )


class JobLogs(BaseModel):
    """The tail of a job's driver log."""

    model_config = _STRICT
    job_id: str = Field(description="Ray submission id.")
    logs: str = Field(description="The last bytes of the log (at most tail_bytes).")
    truncated: bool = Field(description="Whether earlier log output was cut off.")


class JobCancelled(BaseModel):
    """The answer to a cancellation."""

    model_config = _STRICT
    job_id: str = Field(description="Ray submission id.")
    stopping: bool = Field(description="True if the job was running and is being stopped.")


__all__ = [
    "FeatureExample",
    "FeatureExamples",
    "FeaturesAt",
    "Health",
    "JobCancelled",
    "JobLogs",
    "JobProgress",
    "JobStatus",
    "JobSubmission",
    "JobSubmitted",
    "Page",
    "PromptDetail",
    "PromptFeatures",
    "PromptSummary",
    "StoreInfo",
    "StoreSummary",
    "SummaryOrder",
]
