"""A job over a million prompts plans and starts with the driver's memory flat in the prompts.

A real cache job (tiny Llama, local Ray, local store) over a generated source
of 1,000,000 prompts: the driver plans 15,625 shards and hands each worker
its shard's source range; the worker builds the records. The job is stopped
after its first commits. Built eagerly, the same prompts would take the
driver ~2 GB (≈ 2 KB a record) and minutes before the first shard.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import ray

from circuitscan.schemas.jobs import CacheParams, ExecutionSpec, JobSpec, TemplateSource
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.runner import run_job
from circuitscan.services.store import FeatureStore

pytestmark = pytest.mark.integration

N_PROMPTS = 1_000_000
# What planning a million prompts may add to the driver's resident memory: the
# shard plans and the bookkeeping of 15,625 shards, not a single prompt record.
RSS_GROWTH_BOUND_MB = 150


class _Stop(Exception):
    """Raised from the progress callback once the job has committed shards."""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_a_million_prompt_job_starts_with_flat_driver_memory(
    local_ray, tiny_hf_model_dir, tiny_hf_sae_dirs, tmp_path: Path
) -> None:
    source = TemplateSource(
        kind="template",
        templates=[
            "When {A} and {B} went to the {P}, {B} gave a ring to",
            "{A} met {B} at the {P}",
        ],
        fillers={"A": [" Mary", " John", " Anna"], "B": [" Tom", " Paul"], "P": [" park", " shop"]},
        distinct=[["A", "B"]],
        n=N_PROMPTS,
        seed=0,
    )
    spec = JobSpec(
        name="million",
        model=ModelSpec(source=str(tiny_hf_model_dir)),
        saes=[SAESpec(source=str(path)) for path in tiny_hf_sae_dirs],
        prompts=source,
        job=CacheParams(kind="cache", gradients=False),
        store=str(tmp_path / "store"),
        shard_size=64,
        execution=ExecutionSpec(num_actors=1, torch_threads=1, batch_size=64),
    )
    process = psutil.Process()
    before = process.memory_info().rss
    seen: dict[str, float] = {}

    def echo(line: str) -> None:
        if line.startswith("job "):
            seen["planned"] = process.memory_info().rss
            assert "1000000 prompts in 15625 shards" in line
        if line.startswith("shards 2/"):
            seen["started"] = process.memory_info().rss
            raise _Stop

    with pytest.raises(_Stop):
        run_job(spec, echo=echo)
    growth_mb = (max(seen["planned"], seen["started"]) - before) / 2**20
    assert growth_mb < RSS_GROWTH_BOUND_MB, f"driver RSS grew {growth_mb:.0f} MB"

    store = FeatureStore.open(spec.store)
    committed = store.committed_entries()
    assert 2 <= len(committed) < 15625
    # The worker built each shard's prompts from the spec and its range: they are the eager
    # generator's prompts of that range.
    from circuitscan.pipelines.tasks.template_filler import fill_templates

    for shard_id in sorted(committed)[:2]:
        stop = 64 * (shard_id + 1)
        eager = fill_templates(source.templates, source.fillers, n=stop, distinct=source.distinct)
        assert store.prompt_records(shard_id) == eager[stop - 64 :]
