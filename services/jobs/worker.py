"""The shard worker: a plain class holding the model and SAEs once.

Constructible and testable without Ray; the pool wraps it with ``ray.remote``
at the edge. Each call computes one shard and writes it to the store itself
(the driver only commits), so shard data never travels through the driver.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from circuitscan.schemas.errors import CircuitscanError
from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.jobs.planning import PromptSlice, ShardPlan
from circuitscan.services.jobs.shard_runner import ShardRunner
from circuitscan.services.jobs.worker_types import ShardOutcome, WorkerInfo
from circuitscan.services.model_loading import load_model
from circuitscan.services.sae_loading import load_sae

__all__ = ["ShardOutcome", "ShardWorker", "WorkerInfo"]


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker the context may be unavailable
        pass
    return ""


class ShardWorker:
    """Loads the job's model and SAEs once; computes shards on demand."""

    def __init__(self, spec_json: str, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = JobSpec.model_validate_json(spec_json)
        # The driver reports the job's progress; N actors' weight-loading bars
        # would only interleave in its log.
        hf_logging.disable_progress_bar()
        self._startup_error: CircuitscanError | None = None
        try:
            loaded = load_model(self.spec.model)
            self.model = loaded.model
            self.saes = [load_sae(sae_spec, self.model) for sae_spec in self.spec.saes]
        except CircuitscanError as exc:
            # An actor whose constructor raises dies, and the driver sees only
            # Ray's ActorDiedError around this message. Kept, the error comes
            # back from the first call as itself (the driver reports it as is).
            self._startup_error = exc
            return
        # The model, tokenizer and libraries are ~500k long-lived objects; left
        # to the collector, each full collection walks them all (~0.25 s pauses
        # in the middle of shards). Frozen, collections see only new objects.
        gc.collect()
        gc.freeze()
        self.info = WorkerInfo(
            model_name=loaded.name,
            model_fingerprint=loaded.fingerprint,
            sae_fingerprints={s.site.label: s.fingerprint for s in self.saes},
            sae_widths={s.site.label: int(s.sae.cfg.d_sae) for s in self.saes},
            sae_hooks={s.site.label: s.site.hook_name for s in self.saes},
            n_ctx=int(self.model.cfg.n_ctx),
            node_id=_node_id(),
            pid=os.getpid(),
        )
        self._runners: dict[str, ShardRunner] = {}

    def describe(self) -> WorkerInfo:
        if self._startup_error is not None:
            raise self._startup_error
        return self.info

    def _runner(self, spec_json: str | None) -> ShardRunner:
        """The runner of a job; a pooled actor serves several jobs on the same model and SAEs."""
        if self._startup_error is not None:
            raise self._startup_error
        key = spec_json or ""
        if key not in self._runners:
            spec = self.spec if spec_json is None else JobSpec.model_validate_json(spec_json)
            if (spec.model, spec.saes) != (self.spec.model, self.spec.saes):
                raise ValueError("this worker holds another model or other SAEs than the job")
            self._runners = {key: job_kind(spec.job.kind).runner(spec, self.model, self.saes)}
        return self._runners[key]

    def run_shard(
        self,
        store_url: str,
        plan: ShardPlan,
        prompts: list[PromptRecord] | PromptSlice,
        context: list[PromptRecord] | None = None,
        spec_json: str | None = None,
    ) -> ShardOutcome:
        """Compute and write one shard (its records, or their source ranges to build them from);
        ``context`` is job-wide data some kinds need."""
        start = time.perf_counter()
        result = self._runner(spec_json).run_shard(store_url, plan, prompts, context)
        return ShardOutcome(
            shard_id=plan.shard_id,
            entry=result.entry,
            index_summaries=result.index_summaries,
            tokens=result.tokens,
            truncated=result.truncated,
            compute_seconds=time.perf_counter() - start,
            node_id=self.info.node_id,
            pid=self.info.pid,
        )

    def verify_nodes(
        self,
        records: list[PromptRecord] | PromptSlice,
        nodes: list[str],
        spec_json: str | None = None,
    ) -> Any:
        """Exact patching of ``nodes`` on ``records``: per-node sum, sum of |Δm| and count."""
        runner = self._runner(spec_json)
        verify = getattr(runner, "verify_nodes", None)
        if verify is None:
            raise ValueError(f"job kind {type(runner).__name__} has no node verification")
        return verify(runner.records_of(records), nodes)

    def ablate_features(
        self,
        records: list[PromptRecord],
        features: list[int],
        shard_id: int,
        spec_json: str | None = None,
    ) -> Any:
        """A targeted scan's round on one shard: exact Δm of ablating ``features`` there."""
        runner = self._runner(spec_json)
        ablate = getattr(runner, "ablate_features", None)
        if ablate is None:
            raise ValueError(f"job kind {type(runner).__name__} has no feature ablation rounds")
        return ablate(records, features, shard_id)

    def certify_nodes(
        self,
        records: list[PromptRecord] | PromptSlice,
        nodes: list[str],
        union_size: int,
        delta: float | None = None,
        spec_json: str | None = None,
    ) -> Any:
        """Random-subset patching of unverified ``nodes`` on ``records``: certification sums
        (bounds at ``delta``; auto verification splits the spec's δ over its rounds)."""
        runner = self._runner(spec_json)
        certify = getattr(runner, "certify_nodes", None)
        if certify is None:
            raise ValueError(f"job kind {type(runner).__name__} has no certification")
        return certify(runner.records_of(records), nodes, union_size, delta)
