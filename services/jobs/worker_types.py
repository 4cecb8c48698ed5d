"""What a shard worker sends back to the driver: plain pydantic, no torch.

Kept apart from :mod:`circuitscan.services.jobs.worker` (which imports
torch, TransformerLens and sae_lens) because the driver unpickles these
from every call: a driver that only plans, commits and talks to warm actors
then never pays the model libraries' import (tens of seconds on a loaded
machine).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class WorkerInfo(BaseModel):
    """What a worker loaded: the store checks these against its metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(description="Model name.")
    model_fingerprint: str = Field(description="Hash of the model weights.")
    sae_fingerprints: dict[str, str] = Field(description="Site label → hash of SAE weights.")
    sae_widths: dict[str, int] = Field(description="Site label → d_sae.")
    sae_hooks: dict[str, str] = Field(description="Site label → TransformerLens hook name.")
    n_ctx: int = Field(description="Model context length in tokens.")
    node_id: str = Field(description="Ray node id ('' outside Ray).")
    pid: int = Field(description="Worker process id.")


class ShardOutcome(BaseModel):
    """A computed and written shard, ready for the driver to commit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shard_id: int = Field(description="Shard index.")
    entry: dict[str, Any] = Field(description="The store's manifest entry (JSON form).")
    index_summaries: dict[str, bytes] | None = Field(
        default=None,
        description="What the merged index folds in of the shard, per site (held by the "
        "driver until folded, never stored: see ShardEntry.index_summaries).",
    )
    tokens: int = Field(description="Real tokens processed (padding excluded).")
    truncated: int = Field(default=0, description="Prompts cut to the token cap.")
    compute_seconds: float = Field(description="Wall time of compute + write in the worker.")
    node_id: str = Field(description="Ray node that ran the shard.")
    pid: int = Field(description="Worker process id.")
