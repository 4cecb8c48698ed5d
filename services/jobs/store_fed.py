"""Driver of a store-fed ``attribute`` job: AtP from a paired cache, then exact verification.

The job's prompts are ``{kind: store, url: CACHE}``. Every check on the cache
(gradients, corrupted activations, metric, finished shards, SAE sites, the
method and node kinds) runs before anything starts. The estimates are Ray
tasks, one per committed shard of the cache (no actor, no model: a task
reads one shard's arrays, :mod:`~circuitscan.services.jobs.kinds.attribute.from_store`),
each writing its node sums as a shard of the job's own store, which the
driver commits: a resume or a retried task (a lost worker) recomputes only
uncommitted shards, and rewrites identical bytes. Then the sums are merged and
ranked like a model-run job's, and the top nodes are verified by exact
patching on actors that load the model (only when ``verify_top_k`` asks; ``auto``
runs the model-run job's rounds of verification and certification on the
actors, from the store's ranking).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray

from circuitscan.schemas.job_results import AttributionJobResult
from circuitscan.schemas.jobs import AttributeParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ShardEntry, StoreLayout
from circuitscan.services.jobs.job_kind import MergeContext, committed_partials
from circuitscan.services.jobs.kinds.attribute import attribution_result, certify_rest, ranked_nodes
from circuitscan.services.jobs.kinds.attribute.from_store import (
    StorePlan,
    StoreSumsPartial,
    estimate_shard,
    merge_store_sums,
    open_source,
)
from circuitscan.services.jobs.kinds.attribute.worker import merge_node_sums
from circuitscan.services.jobs.planning import plan_shards
from circuitscan.services.jobs.progress import Progress
from circuitscan.services.jobs.ray_pool import (
    acquire_actors,
    actor_count,
    connect,
    describe,
    fan_out,
    release_actors,
)
from circuitscan.services.jobs.spec_checks import JobError, check_named_positions
from circuitscan.services.store import FeatureStore, StoreError
from circuitscan.services.store.lease import StoreLease
from circuitscan.services.store.results import delete_job_result, write_job_result


def _estimates(
    spec: JobSpec, shard_ids: list[int], commit: Callable[[dict[str, Any]], None]
) -> None:
    """Run the shards' estimate tasks, at most one per cluster CPU at a time, committing each.

    The tasks reserve no CPU: pooled actors (``keep_actors``) may hold every
    CPU of the cluster while idle, and the limit here bounds the tasks instead.
    """
    # The task's function lives in from_store.py, whose imports stay light (no torch,
    # no model code): a fresh task worker imports only what it reads with.
    task = ray.remote(estimate_shard).options(  # type: ignore[attr-defined]
        num_cpus=0, max_retries=spec.execution.max_retries, scheduling_strategy="SPREAD"
    )
    spec_json = spec.model_dump_json()
    limit = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending = list(shard_ids)
    in_flight: list[Any] = []
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            in_flight.append(task.remote(spec_json, pending.pop(0)))
        done, in_flight = ray.wait(in_flight, num_returns=1)
        commit(ray.get(done[0]))


def _records(source: FeatureStore, shard_ids: list[int]) -> list[PromptRecord]:
    return [record for shard_id in shard_ids for record in source.prompt_records(shard_id)]


def run_from_store(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
    keep_actors: bool = False,
    verify: bool = False,
) -> Any:
    """Run (or finish) a store-fed attribute job; a JobSummary like ``run_job``'s."""
    from circuitscan.services.jobs.runner import JobSummary, _has_result, _refuse_other_job

    started = time.perf_counter()
    say = echo or (lambda _line: None)
    source, plan = open_source(spec)
    assert isinstance(spec.job, AttributeParams)
    params = spec.job
    records = _records(source, plan.shard_ids)
    check_named_positions(spec, records)
    _refuse_other_job(spec, overwrite)
    lease = StoreLease(spec.store, job=spec.name, say=say).take()
    actors: list[Any] = []
    use_gpu = False
    nodes: Counter[str] = Counter()
    tokens = 0
    try:
        connect(address)
        layout = StoreLayout(
            sites=[],
            gradients=False,
            shard_size=source.layout.shard_size,
            model_fingerprint=source.layout.model_fingerprint,
            job_hash=spec.content_hash(),
            job_spec=spec.model_dump(mode="json"),
        )
        try:
            store = FeatureStore.create(spec.store, layout, overwrite=overwrite)
        except StoreError as exc:
            raise JobError(str(exc)) from exc
        todo = store.uncommitted(plan.shard_ids, verify=verify)
        if todo:
            delete_job_result(store, "attribute")
        say(
            f"job {spec.name!r}: AtP from {plan.source} ({len(records)} prompts, "
            f"{len(plan.shard_ids)} shards, {len(plan.shard_ids) - len(todo)} already done; "
            f"sites {list(plan.sites)}) → {spec.store}"
        )
        progress = Progress(len(todo), echo=say if echo else None)

        def commit(outcome: dict[str, Any]) -> None:
            nonlocal tokens
            lease.check()
            store.commit_shard(ShardEntry.model_validate(outcome["entry"]))
            nodes[outcome.get("node_id", "")] += 1
            tokens += int(outcome["tokens"])
            progress.shard_done(int(outcome["tokens"]))

        driving = time.perf_counter()
        _estimates(spec, todo, commit)
        estimate_seconds = time.perf_counter() - driving
        if todo or not _has_result(store, spec):
            if params.verify_top_k:
                n_actors, use_gpu = actor_count(spec.execution, len(plan.shard_ids))
                actors = acquire_actors(spec, n_actors, use_gpu, reuse=keep_actors)
                _check_fingerprints(spec, source, describe(actors[0]))
            result = merge_and_verify(spec, store, records, plan, actors, say)
            write_job_result(store, result)
    finally:
        try:
            if actors:
                release_actors(spec, actors, use_gpu, reuse=keep_actors)
        finally:
            lease.release()
    return JobSummary(
        name=spec.name,
        kind=spec.job.kind,
        store=spec.store,
        job_hash=spec.content_hash(),
        prompts=len(records),
        rejected=0,
        truncated=0,
        shards_total=len(plan.shard_ids),
        shards_run=sum(nodes.values()),
        shards_reused=len(plan.shard_ids) - len(todo),
        shards_recomputed_corrupt=len(getattr(store, "corrupt_shards", [])),
        tokens=tokens,
        seconds=time.perf_counter() - started,
        drive_seconds=estimate_seconds,
        compute_seconds=0.0,
        actors=len(actors),
        retries=0,
        nodes=dict(nodes),
    )


def _check_fingerprints(spec: JobSpec, source: FeatureStore, info: Any) -> None:
    """The actors' model and SAEs must be those the cache was computed with."""
    layout = source.layout
    if layout.model_fingerprint and info.model_fingerprint != layout.model_fingerprint:
        raise JobError(
            f"the model loaded for verification ({spec.model.source}) is not the one store "
            f"{source.url} was cached with (fingerprints differ)"
        )
    for site in layout.sites:
        loaded = info.sae_fingerprints.get(site.label)
        if loaded is not None and site.sae_fingerprint and loaded != site.sae_fingerprint:
            raise JobError(
                f"the SAE at {site.label} differs from the one store {source.url} cached"
            )


def merge_and_verify(
    spec: JobSpec,
    store: FeatureStore,
    records: list[PromptRecord],
    plan: StorePlan,
    actors: list[Any],
    say: Callable[[str], None],
) -> AttributionJobResult:
    """The job result: merged, ranked like a model-run job's; the top verified on ``actors``."""
    params = spec.job
    assert isinstance(params, AttributeParams)
    store.refresh()
    want = len(records) and (
        10**18 if params.certify is not None else max(params.top_nodes, params.verify_top_k)
    )
    estimates, n_nodes = merge_store_sums(committed_partials(store, StoreSumsPartial), plan, want)
    exact = certification = None
    ctx = MergeContext(
        spec=spec,
        n_prompts=store.n_prompts(),
        kept=records,
        site=None,
        say=say,
        fan_out=lambda method, calls: fan_out(spec, actors, method, calls),
    )
    if params.verify_top_k == "auto":
        # Rounds of exact patching and certification on the actors, exactly as a model-run
        # job runs them on its estimates (auto_verify.py); these estimates come from the store.
        from circuitscan.services.jobs.kinds.attribute.auto_verify import verify_auto

        auto = verify_auto(params, estimates, ctx)
        return auto.model_copy(update={"n_nodes": n_nodes})
    if params.verify_top_k:
        top = ranked_nodes(estimates, params.verify_top_k)
        say(f"verifying the top {len(top)} nodes by exact patching")
        plans = plan_shards(len(records), spec.shard_size)
        parts = ctx.fan_out("verify_nodes", [(records[p.start : p.stop], top) for p in plans])
        exact = merge_node_sums(parts)
        if params.certify is not None:
            certification = certify_rest(params, estimates, set(top), ctx)
    result = attribution_result(spec, store.n_prompts(), estimates, exact, certification)
    return result.model_copy(update={"n_nodes": n_nodes})
