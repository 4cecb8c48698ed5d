"""The end-to-end IOI story on the embedded defaults (``circuitscan demo``).

Default model and SAEs, local embedded Ray, local Zarr stores under ``out``:

1. generate IOI prompts; logit difference of the clean model and with each
   SAE spliced in without its error term (is the SAE good enough?);
2. cache activations and gradients of the logit difference into a store
   (a Ray job), then query it: the features that push the answer hardest.

Each step is a real job or query that a user can run on its own; the demo
only chains them with small defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from circuitscan.pipelines.batching import tokenize_prompts
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.splice import spliced
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.jobs import CacheParams, ExecutionSpec, IOISource, JobSpec
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.models import SAESpec
from circuitscan.services.model_loading import load_model
from circuitscan.services.sae_loading import DEFAULT_PREFIX, LoadedSAE, load_default_saes

Echo = Callable[[str], None]


@torch.no_grad()
def splice_sanity(model, saes: list[LoadedSAE], n_prompts: int, seed: int, echo: Echo) -> None:
    """Mean IOI logit difference, clean and with each SAE spliced without its error term."""
    records = generate_ioi(model.tokenizer, n_prompts, seed=seed)
    batch = tokenize_prompts(model, records)

    def mean_diff() -> float:
        logits = model(batch.tokens)
        per_prompt = metric_per_prompt(
            logits, MetricSpec(), lengths=batch.lengths, answer=batch.answer, wrong=batch.wrong
        )
        return float(per_prompt.mean())

    echo(f"IOI logit difference (IO − S), {n_prompts} prompts:")
    echo(f"  clean model                      {mean_diff():6.2f}")
    for loaded in saes:
        with spliced(model, [loaded.sae], use_error_term=False):
            echo(f"  {loaded.name + ' spliced (no error)':32s} {mean_diff():6.2f}")


def cache_spec(out: Path, saes: list[LoadedSAE], n_prompts: int, seed: int) -> JobSpec:
    return JobSpec(
        name="ioi-cache",
        saes=[SAESpec(source=DEFAULT_PREFIX + s.name) for s in saes],
        prompts=IOISource(kind="ioi", n=n_prompts, seed=seed),
        job=CacheParams(kind="cache"),
        store=str(out / "cache"),
        shard_size=max(1, n_prompts // 4),
        execution=ExecutionSpec(batch_size=8),
    )


def run_demo(
    n_prompts: int = 8, seed: int = 0, out: Path | None = None, echo: Echo = print
) -> Path:
    """Run the demo; returns the output folder."""
    from circuitscan.services.jobs.runner import run_job
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store.queries import features_at

    started = time.perf_counter()
    out = (out or Path("runs") / "ioi-demo").resolve()
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model()
    echo(
        f"model {loaded.name} ({loaded.model.cfg.n_layers} layers) loaded in {loaded.seconds:.1f}s"
        + (" (converted from GGUF)" if loaded.converted else " (cached)")
    )
    saes = load_default_saes(loaded.model)
    echo("SAEs: " + ", ".join(f"{s.name} @ {s.site.hook_name}" for s in saes))
    splice_sanity(loaded.model, saes, n_prompts, seed, echo)

    echo("\n== cache activations and gradients (Ray job)")
    summary = run_job(cache_spec(out, saes, n_prompts, seed), overwrite=True, echo=echo)
    echo(summary.render())
    store = FeatureStore.open(summary.store)
    for loaded_sae in saes:
        label = loaded_sae.site.label
        last = len(store.prompt_tokens(0)) - 1
        active = features_at(store, label, 0, last, limit=5)
        top = zip(active.feature_ids, active.attributions or [], strict=False)
        echo(
            f"  {label}: prompt 0, last token — top features by |activation × gradient|: "
            + ", ".join(f"#{f} ({a:+.3f})" for f, a in top)
        )
    echo(f"\ndone in {time.perf_counter() - started:.0f}s; stores under {out}")
    return out
