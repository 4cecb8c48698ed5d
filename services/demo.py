"""The end-to-end IOI story on the embedded defaults (``circuitscan demo``).

Default model and SAEs, local embedded Ray, local Zarr stores under ``out``:

1. cache SAE activations and gradients of the IOI logit difference (a job);
2. AtP* over attention heads and SAE features on clean/ABC-corrupted pairs,
   top nodes verified by exact patching (a job);
3. an exact ablation scan of every feature active at the last token (a job);
4. a splice evaluation of each SAE (a job);
5. DFA of the attention-output SAE's most attributed features (a job);
6. an offline HTML report of all of it: each job's tables and the figures
   (attribution maps, AtP-vs-exact scatter, feature bars, ablation Δm, DFA),
   linked to the cache store's feature pages.

Every step is a job spec a user can run alone with ``circuitscan run``; the
demo only chains them with small defaults and shares one pool of Ray actors
(the model is loaded once per actor, not once per job).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from circuitscan.schemas.job_results import AblationJobResult, AttributionJobResult
from circuitscan.schemas.jobs import (
    AblationScanParams,
    AttributeParams,
    CacheParams,
    DFAParams,
    ExecutionSpec,
    IOISource,
    JobParams,
    JobSpec,
    SpliceEvalParams,
)
from circuitscan.schemas.models import SAESpec
from circuitscan.services.model_loading import load_model
from circuitscan.services.sae_loading import DEFAULT_PREFIX, LoadedSAE, load_default_saes

Echo = Callable[[str], None]


def demo_specs(out: Path, saes: list[LoadedSAE], n_prompts: int, seed: int) -> dict[str, JobSpec]:
    """The job specs of the story (dfa only with a hook_z SAE), sharing model, SAEs and prompts."""
    sae_specs = [SAESpec(source=DEFAULT_PREFIX + s.name) for s in saes]
    resid = next((s.site.label for s in saes if s.site.point == "resid_post"), saes[0].site.label)
    params: dict[str, JobParams] = {
        "cache": CacheParams(kind="cache"),
        "attribute": AttributeParams(
            kind="attribute",
            method="atpstar",
            nodes=["z", "q", "k", "v", "feature"],
            positions=["IO", "S1", "S2", "END"],
            verify_top_k=10,
            top_nodes=40,
        ),
        "ablation_scan": AblationScanParams(
            kind="ablation_scan", site=resid, mode="zero", positions="last"
        ),
        "splice_eval": SpliceEvalParams(
            kind="splice_eval",
            layer_sets=[[s.site.label for s in saes]] if len(saes) > 1 else [],
            reference_prompts=n_prompts,
        ),
    }
    if any(s.site.point == "z" for s in saes):
        params["dfa"] = DFAParams(kind="dfa", position="END", top_features=4)
    return {
        name: JobSpec(
            name=f"ioi-{name}",
            saes=sae_specs,
            prompts=IOISource(kind="ioi", n=n_prompts, seed=seed),
            job=job,
            store=str(out / name),
            shard_size=max(1, -(-n_prompts // 4)),
            execution=ExecutionSpec(batch_size=8),
        )
        for name, job in params.items()
    }


def _findings(attribution: AttributionJobResult, ablation: AblationJobResult) -> list[str]:
    lines = ["top nodes by AtP* (mean effect on the logit difference, clean → corrupted):"]
    for node in attribution.top[:8]:
        check = ""
        if node.verification is not None:
            check = f"  exact {node.verification.exact_mean:+.3f} ({node.verification.status})"
        lines.append(f"  {node.node:40s} {node.mean:+.3f}{check}")
    lines.append(
        f"features whose zero-ablation moves the logit difference most ({ablation.site}, last token):"
    )
    for feature in ablation.features[:5]:
        lines.append(
            f"  feature {feature.feature:5d}  mean Δ {feature.mean_delta:+.3f} "
            f"(active on {feature.n_active}/{feature.n_prompts} prompts)"
        )
    return lines


def run_demo(
    n_prompts: int = 16, seed: int = 0, out: Path | None = None, echo: Echo = print
) -> Path:
    """Run the whole story; returns the report's path."""
    import ray

    from circuitscan.services.demo_report import write_demo_report
    from circuitscan.services.jobs.runner import run_job
    from circuitscan.services.store.results import read_result

    started = time.perf_counter()
    out = (out or Path("runs") / "ioi-demo").resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Load once here first: the first load converts the GGUF, and the Ray
    # workers then all read the converted copy instead of racing to write it.
    loaded = load_model()
    echo(
        f"model {loaded.name}: {loaded.model.cfg.n_layers} layers, loaded in {loaded.seconds:.1f}s"
        + (" (converted from GGUF, cached for next time)" if loaded.converted else " (cached)")
    )
    saes = load_default_saes(loaded.model)
    echo("SAEs: " + ", ".join(f"{s.name} @ {s.site.hook_name}" for s in saes))
    specs = demo_specs(out, saes, n_prompts, seed)
    # Feature pages' logit effects and reading heads come from the weights: computed
    # while the model is loaded here, kept in the cache store once its job has made it.
    from circuitscan.services.feature_directions_run import directions_arrays

    directions = {s.site.label: directions_arrays(loaded.model, s.sae) for s in saes}
    del loaded, saes  # the jobs run in Ray workers; the driver needs no model
    try:
        for step, spec in specs.items():
            echo(f"\n== {step}: {spec.name} → {spec.store}")
            summary = run_job(spec, overwrite=True, echo=echo, keep_actors=True)
            echo(summary.render())
    finally:
        if ray.is_initialized():
            ray.shutdown()
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.feature_directions import write_directions

    cache_store = FeatureStore.open(specs["cache"].store)
    for label, arrays in directions.items():
        write_directions(cache_store, label, arrays)
    attribution = read_result(specs["attribute"].store, "attribute")
    ablation = read_result(specs["ablation_scan"].store, "ablation_scan")
    splice = read_result(specs["splice_eval"].store, "splice_eval")
    dfa = read_result(specs["dfa"].store, "dfa") if "dfa" in specs else None
    assert isinstance(attribution, AttributionJobResult)
    assert isinstance(ablation, AblationJobResult)
    from circuitscan.services.query_commands import _decoder

    report = write_demo_report(
        out / "report", specs, attribution, ablation, splice, dfa, decode=_decoder(cache_store)
    )
    echo("")
    for line in _findings(attribution, ablation):
        echo(line)
    echo(f"\nreport: {report}")
    echo(f"done in {time.perf_counter() - started:.0f}s; stores under {out}")
    return report
