"""Cut a prompt set into shards: contiguous prompt ranges, one writer each."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ShardPlan(BaseModel):
    """Prompts ``[start, stop)`` of the job's prompt list form shard ``shard_id``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shard_id: int = Field(ge=0, description="Shard index, 0-based.")
    start: int = Field(ge=0, description="First prompt index (inclusive).")
    stop: int = Field(ge=1, description="Last prompt index (exclusive).")

    @property
    def size(self) -> int:
        return self.stop - self.start


class PromptSlice(BaseModel):
    """Which prompts of the job's source a shard holds: source index ranges ``[start, stop)``.

    What the driver sends a worker instead of the records (the worker builds
    them from the spec): one range, or several where the token cap rejected
    prompts in between.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ranges: list[tuple[int, int]] = Field(description="Source index ranges, in order.")

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


def plan_shards(n_prompts: int, shard_size: int) -> list[ShardPlan]:
    """Equal contiguous ranges of ``shard_size`` prompts (the last may be shorter)."""
    if n_prompts <= 0:
        raise ValueError("the prompt set is empty: nothing to run")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [
        ShardPlan(shard_id=index, start=start, stop=min(start + shard_size, n_prompts))
        for index, start in enumerate(range(0, n_prompts, shard_size))
    ]
