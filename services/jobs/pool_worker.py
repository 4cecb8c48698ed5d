"""The warm pool's actor: a shard worker that also gives an account of its process.

A pool actor lives across jobs; ``pool_stats`` says how many times its
process loaded a model (1 while it has served every job from one load), how
many shards and how many distinct jobs it ran, so ``circuitscan up --status``
and the tests can tell a reused actor from a fresh one.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.planning import PromptSlice, ShardPlan
from circuitscan.services.jobs.worker import ShardWorker
from circuitscan.services.jobs.worker_types import ShardOutcome

# Model loads in this process: one per worker constructed here.
_LOADS = [0]


class PoolWorker(ShardWorker):
    """A :class:`ShardWorker` that counts its loads, shards and jobs."""

    def __init__(self, spec_json: str, torch_threads: int | None = None) -> None:
        _LOADS[0] += 1
        super().__init__(spec_json, torch_threads)
        self._shards = 0
        self._jobs: set[str] = set()

    def run_shard(
        self,
        store_url: str,
        plan: ShardPlan,
        prompts: list[PromptRecord] | PromptSlice,
        context: list[PromptRecord] | None = None,
        spec_json: str | None = None,
    ) -> ShardOutcome:
        outcome = super().run_shard(store_url, plan, prompts, context, spec_json)
        self._shards += 1
        self._jobs.add(hashlib.sha256((spec_json or "").encode()).hexdigest())
        return outcome

    def pool_stats(self) -> dict[str, Any]:
        import ray

        return {
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "pid": os.getpid(),
            "model_loads": _LOADS[0],
            "shards": self._shards,
            "jobs": len(self._jobs),
        }
