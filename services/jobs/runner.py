"""Driver side of a job: prompts → plan → store → actors → commits → summary.

The same code runs on an embedded local Ray and on a cluster (inside a Ray
job, ``RAY_ADDRESS`` points ``ray.init`` at the cluster). The driver never
holds shard data: workers write shards, the driver commits manifest entries.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.jobs import JobSpec
from circuitscan.schemas.models import ModelSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.schemas.store import ShardEntry
from circuitscan.services.jobs.input_digest import check_inputs, record_inputs
from circuitscan.services.jobs.job_kind import MergeContext, committed_partials
from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.jobs.planning import plan_shards
from circuitscan.services.jobs.preflight import check_model_and_saes
from circuitscan.services.jobs.progress import Progress
from circuitscan.services.jobs.prompt_plan import (
    KeptPrompts,
    check_kept,
    check_source,
    every_prompt_record,
    select,
)
from circuitscan.services.jobs.prompt_sources import open_prompts
from circuitscan.services.jobs.ray_pool import describe, drive, fan_out
from circuitscan.services.jobs.spec_checks import JobError, check_sites
from circuitscan.services.jobs.warm_pool import job_actors, pool_holds
from circuitscan.services.jobs.worker_types import ShardOutcome
from circuitscan.services.model_loading import load_tokenizer
from circuitscan.services.store import FeatureStore, StoreError
from circuitscan.services.store.backends import open_location
from circuitscan.services.store.errors import CorruptResultError, StoreNotFoundError
from circuitscan.services.store.lease import StoreLease
from circuitscan.services.store.results import (
    delete_job_result,
    read_result,
    write_job_array,
    write_job_result,
)
from circuitscan.services.store.store_keys import refuse_non_store


class JobSummary(BaseModel):
    """What a finished job did."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Job name.")
    kind: str = Field(description="Job kind.")
    store: str = Field(description="Store URL.")
    job_hash: str = Field(description="JobSpec.content_hash().")
    prompts: int = Field(description="Prompts in the store.")
    rejected: int = Field(description="Prompts skipped for exceeding the token cap.")
    truncated: int = Field(
        description="Prompts cut to the token cap in the shards this run computed."
    )
    shards_total: int = Field(description="Shards in the job.")
    shards_run: int = Field(description="Shards computed by this run.")
    shards_reused: int = Field(description="Shards already committed before this run.")
    shards_recomputed_corrupt: int = Field(description="Committed shards found corrupt and redone.")
    tokens: int = Field(description="Real tokens computed by this run.")
    seconds: float = Field(description="Wall time of this run (s).")
    compute_seconds: float = Field(description="Sum of worker compute+write time (s).")
    drive_seconds: float = Field(
        default=0.0,
        description="Wall time from the first shard submitted to the last committed (s).",
    )
    actors: int = Field(description="Worker actors used.")
    retries: int = Field(description="Shards re-queued after losing their worker.")
    nodes: dict[str, int] = Field(description="Ray node id → shards it computed.")
    pids: list[int] = Field(default_factory=list, description="Worker processes that ran shards.")

    def render(self) -> str:
        # Actor start-up (model loading) dominates short jobs, so the shard
        # phase's own rate is the figure that says how fast the pool computes.
        rate = self.tokens / self.drive_seconds if self.drive_seconds else 0.0
        lines = [
            f"job {self.name!r} ({self.kind}) done in {self.seconds:.1f}s → {self.store}",
            f"  prompts {self.prompts} (rejected {self.rejected}, truncated {self.truncated})",
            f"  shards {self.shards_total}: ran {self.shards_run}, reused {self.shards_reused}, "
            f"recomputed corrupt {self.shards_recomputed_corrupt}, retries {self.retries}",
            f"  tokens {self.tokens} in {self.drive_seconds:.1f}s of shards ({rate:,.0f} tok/s) "
            f"on {self.actors} actor(s), {len(self.nodes)} node(s); "
            f"start-up and commit {max(self.seconds - self.drive_seconds, 0.0):.1f}s",
        ]
        return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def _tokenizer(model: ModelSpec) -> Any:
    """The model's tokenizer, loaded once per driver process (jobs in a row reuse it)."""
    return load_tokenizer(model)


def _refuse_other_job(spec: JobSpec, overwrite: bool) -> None:
    """Fail fast (before any actor starts) when the store already holds a different job,
    or the location holds something that is not a store (never replaced, --overwrite or not)."""
    try:
        existing = FeatureStore.open(spec.store)
    except StoreNotFoundError:
        refuse_non_store(open_location(spec.store), spec.store)
        return  # no store yet
    except StoreError:
        return  # FeatureStore.create reports it
    if overwrite:
        return
    if existing.layout.job_hash != spec.content_hash():
        held = (existing.layout.job_spec or {}).get("name", "?")
        raise JobError(
            f"store {spec.store} already holds a different job ({held!r}, hash "
            f"{existing.layout.job_hash}; this job's hash is {spec.content_hash()}); "
            "use another store or --overwrite to replace it"
        )


def _context(spec: JobSpec, kept: KeptPrompts) -> list[PromptRecord] | None:
    """Reference prompts every shard needs (one job-wide reference, not one per shard)."""
    return job_kind(spec.job.kind).context(spec.job, kept)


def _finish_result(
    spec: JobSpec,
    store: FeatureStore,
    actors: list[Any],
    kept: KeptPrompts,
    say: Callable[[str], None],
    site: str | None,
) -> None:
    """Merge the committed shards' partials into the job-level result (kinds that have one)."""
    kind = job_kind(spec.job.kind)
    if kind.result is None or kind.partial is None:
        return
    store.refresh()  # the prompt count below and the partials read the same manifest
    ctx = MergeContext(
        spec=spec,
        n_prompts=store.n_prompts(),
        kept=kept,
        site=site,
        say=say,
        fan_out=lambda method, calls: fan_out(spec, actors, method, calls),
        write_array=functools.partial(write_job_array, store, kind.name),
    )
    write_job_result(store, kind.merge(spec.job, committed_partials(store, kind.partial), ctx))


def _refuse_private_store(url: str) -> None:
    """A job's actors are other processes: a store only this one can reach is refused
    before anything starts (each actor would write a store of its own)."""
    location = open_location(url)
    if not location.shared_across_processes:
        raise JobError(
            f"store {url} is {location.describe()}, which only this process can reach; "
            "the job's Ray actors run in processes of their own: use a local path or "
            "s3://BUCKET/PREFIX"
        )


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
    keep_actors: bool = False,
    verify: bool = False,
    use_pool: bool | None = None,
) -> JobSummary:
    """Run (or finish) ``spec``: only shards not yet committed are computed.

    Committed shards are trusted by their manifest entries (each read and
    parsed), so finishing a job reads no shard data back; the store's
    readers verify every object they read. ``verify`` also reads every
    committed shard back against its checksums first and recomputes the ones
    that fail (on object storage: a download of the whole store).
    ``keep_actors`` leaves the workers alive for the next job of this process
    on the same model and SAEs (they go when Ray shuts down). With no
    ``address``, a running warm pool (``circuitscan up``) is joined and its
    actors used when they hold this job's model and SAEs
    (:mod:`~circuitscan.services.jobs.warm_pool`); ``use_pool=False`` (or
    ``$CIRCUITSCAN_NO_POOL``) never joins one.
    """
    _refuse_private_store(spec.store)
    if spec.prompts.kind == "store":  # AtP from a paired cache's values (store_fed.py)
        from circuitscan.services.jobs.store_fed import run_from_store

        return run_from_store(  # type: ignore[no-any-return]
            spec, address=address, overwrite=overwrite, echo=echo, keep_actors=keep_actors,
            verify=verify,
        )  # fmt: skip
    started = time.perf_counter()
    say = echo or (lambda _line: None)
    # A model or SAE that files show cannot work is refused before anything starts
    # (warm pool actors that loaded these very files have shown they work).
    if not pool_holds(spec, address, use_pool):
        check_model_and_saes(spec)
    tokenizer = functools.partial(_tokenizer, spec.model)
    # The prompts stay in their source: the driver holds counts, the rejected
    # indices and ranges; each worker builds its own shard's records.
    prompts = open_prompts(spec.prompts, tokenizer)
    inputs = check_source(spec, prompts)
    _refuse_other_job(spec, overwrite)
    # One writer per store: taken before anything touches the store or starts
    # (a second run is refused here), released however the job ends.
    lease = StoreLease(spec.store, job=spec.name, say=say).take()
    try:
        if not overwrite:  # an edited prompt file is another job, refused before Ray starts
            check_inputs(spec, inputs, lambda: every_prompt_record(spec, prompts))
        n_shards = -(-len(prompts) // spec.shard_size)
        crew = job_actors(spec, address, n_shards, say, keep_actors=keep_actors, use_pool=use_pool)
        actors, n_actors = crew.actors, len(crew.actors)
    except BaseException:
        lease.release()
        raise
    try:
        info = describe(actors[0])
        kept, rejected = select(spec, prompts, info.n_ctx, tokenizer)
        if not len(kept):
            raise JobError(f"all {len(prompts)} prompts exceed the token cap; nothing to run")
        site = check_sites(spec, info)
        check_kept(spec, kept, say)
        plans = plan_shards(len(kept), spec.shard_size)
        try:
            store = FeatureStore.create(
                spec.store, job_kind(spec.job.kind).store_layout(spec, info), overwrite=overwrite
            )
        except StoreError as exc:
            raise JobError(str(exc)) from exc
        record_inputs(spec, inputs)
        already = store.committed_shard_ids()
        todo_ids = set(store.uncommitted(range(len(plans)), verify=verify))
        corrupt = len(todo_ids & already)
        todo = [plan for plan in plans if plan.shard_id in todo_ids]
        if todo:  # a stored result would no longer match the shards: drop it first
            delete_job_result(store, spec.job.kind)
        say(
            f"job {spec.name!r}: {len(kept)} prompts in {len(plans)} shards "
            f"({len(plans) - len(todo)} already committed) on {n_actors} actor(s) → {spec.store}"
        )
        progress = Progress(len(todo), echo=say if echo else None)

        def commit(outcome: ShardOutcome) -> None:
            lease.check()  # a driver whose lease was taken over commits nothing more
            # The worker checksummed the bytes as it wrote them, and every reader
            # checks what it reads against the entry: reading the shard back here
            # would only cap the job at the driver's read bandwidth (resume --verify
            # is the full check).
            entry = ShardEntry.model_validate(outcome.entry)
            store.commit_shard(entry.with_index_summaries(outcome.index_summaries), verify=False)
            progress.shard_done(outcome.tokens)

        # Index flushes fold and persist on a thread of their own: a commit is its entry.
        store.index.background = True
        driving = time.perf_counter()
        stats = drive(spec, actors, todo, kept, spec.store, commit, _context(spec, kept))
        drive_seconds = time.perf_counter() - driving
        store.flush_index()
        if todo or not _has_result(store, spec):
            _finish_result(spec, store, actors, kept, say, site)
    finally:
        try:
            crew.release(spec, keep_actors)
        finally:
            lease.release()
    outcomes = stats.outcomes
    return JobSummary(
        name=spec.name,
        kind=spec.job.kind,
        store=spec.store,
        job_hash=spec.content_hash(),
        prompts=len(kept),
        rejected=rejected,
        truncated=sum(o.truncated for o in outcomes),
        shards_total=len(plans),
        shards_run=len(outcomes),
        shards_reused=len(plans) - len(todo),
        shards_recomputed_corrupt=corrupt,
        tokens=sum(o.tokens for o in outcomes),
        seconds=time.perf_counter() - started,
        drive_seconds=drive_seconds,
        compute_seconds=sum(o.compute_seconds for o in outcomes),
        actors=n_actors,
        retries=stats.retries,
        nodes=dict(Counter(o.node_id for o in outcomes)),
        pids=sorted({o.pid for o in outcomes}),
    )


def _has_result(store: FeatureStore, spec: JobSpec) -> bool:
    if job_kind(spec.job.kind).result is None:
        return True
    try:
        return read_result(store, spec.job.kind).job_hash == spec.content_hash()
    except (StoreError, CorruptResultError):  # a missing or damaged result is rewritten
        return False


def resume_job(
    store_url: str,
    *,
    address: str | None = None,
    echo: Callable[[str], None] | None = None,
    verify: bool = False,
    use_pool: bool | None = None,
    keep_actors: bool = False,
) -> JobSummary:
    """Finish the job recorded in a store, recomputing only uncommitted shards (and, with
    ``verify``, committed ones whose bytes fail their checksums; see :func:`run_job`)."""
    try:
        store = FeatureStore.open(store_url)
    except StoreError as exc:
        raise JobError(str(exc)) from exc
    if store.layout.job_spec is None:
        raise JobError(f"{store_url} records no job spec; it cannot be resumed")
    # The store may have moved since the job started: resume where it is now.
    spec = JobSpec.model_validate(store.layout.job_spec).model_copy(update={"store": store_url})
    return run_job(
        spec, address=address, echo=echo, verify=verify, use_pool=use_pool,
        keep_actors=keep_actors,
    )  # fmt: skip
