"""Store-fed AtP on the default model and its SAEs equals the model-run AtP job.

Four IOI prompts, one actor: a paired cache job, a model-run ``attribute`` job
(``method: atp``, nodes ``sae_feature`` + ``sae_error``, every position) on the
pooled actor, and the store-fed job on the cache (no model). Node by node the
two agree within the float16 storage bound of docs/paired_caches.md:
(2u + u²)·(|a'·g'| + |a·g|) per feature node (u = 2⁻¹¹), float32 rounding for
the error nodes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import ray

from circuitscan.schemas.jobs import (
    AttributeParams,
    CacheParams,
    ExecutionSpec,
    IOISource,
    JobSpec,
    StoreSource,
)
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.runner import run_job
from circuitscan.services.sae_loading import default_sae_names
from circuitscan.services.store import FeatureStore
from circuitscan.services.store.results import read_result

pytestmark = pytest.mark.slow

U16 = 2.0**-11


def _spec(store, job, **fields) -> JobSpec:
    base = {
        "name": "default-store-fed",
        "model": ModelSpec(),
        "saes": [SAESpec(source=f"default/{name}") for name in default_sae_names()],
        "prompts": IOISource(kind="ioi", n=4, seed=0),
        "job": job,
        "store": str(store),
        "shard_size": 2,
        "execution": ExecutionSpec(num_actors=1, torch_threads=1, batch_size=4),
    }
    return JobSpec(**{**base, **fields})


def _scales(url: str) -> dict[str, float]:
    """Per feature node (by token index), mean over prompts of |a'·g'| + |a·g|."""
    store = FeatureStore.open(url)
    total: dict[str, float] = {}
    having: dict[str, int] = {}
    for shard in sorted(store.committed_shard_ids()):
        offsets = store.prompt_shard(shard).prompt_offsets
        position = np.concatenate([np.arange(b - a) for a, b in itertools.pairwise(offsets)])
        for q in position.tolist():
            having[str(q)] = having.get(str(q), 0) + 1
        for site in store.layout.sites:
            for part in (
                store.site_shard(shard, site.label),
                store.paired_site_shard(shard, site.label),
            ):
                assert part.gradients is not None
                token = np.repeat(np.arange(len(position)), np.diff(part.token_offsets))
                product = np.abs(part.activations.astype(np.float64) * part.gradients)
                for t, f, v in zip(
                    token.tolist(), part.feature_ids.tolist(), product.tolist(), strict=True
                ):
                    key = f"feature:{site.label}:{f}@{position[t]}"
                    total[key] = total.get(key, 0.0) + v
    return {key: v / having[key.rsplit("@", 1)[1]] for key, v in total.items()}


def test_store_fed_atp_equals_the_model_run_job_on_the_default_model(tmp_path) -> None:
    params = AttributeParams(
        kind="attribute", method="atp", nodes=["sae_feature", "sae_error"], positions="all",
        top_nodes=100_000,
    )  # fmt: skip
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        cache = _spec(tmp_path / "cache", CacheParams(kind="cache", paired=True))
        run_job(cache, keep_actors=True)
        model_run = _spec(tmp_path / "model-atp", params)
        run_job(model_run, keep_actors=True)
        from_store = _spec(
            tmp_path / "store-atp", params, prompts=StoreSource(kind="store", url=cache.store)
        )
        assert run_job(from_store).actors == 0  # no model for the estimates
    finally:
        ray.shutdown()
    theirs = {e.node: e for e in read_result(model_run.store).top}
    ours = {e.node: e for e in read_result(from_store.store).top}
    assert read_result(from_store.store).n_nodes == read_result(model_run.store).n_nodes
    scale = _scales(cache.store)
    live = [name for name, e in theirs.items() if e.mean_abs > 1e-9]
    assert any(n.startswith("sae_error:") for n in live) and len(live) > 100
    worst = 0.0
    for name in live:
        assert name in ours, name
        a, b = ours[name], theirs[name]
        bound = (2 * U16 + U16**2) * scale.get(name, 0.0) + 1e-5 * abs(b.mean) + 1e-6
        assert abs(a.mean - b.mean) <= bound, (name, a.mean, b.mean, bound)
        assert a.n_prompts == b.n_prompts, name
        worst = max(worst, abs(a.mean - b.mean))
    print(f"{len(live)} nodes; largest |store-fed − model-run| mean AtP {worst:.3g}")
