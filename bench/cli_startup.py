"""CLI start-up benchmark: whole-process time of the store commands on a real small store.

    .venv/bin/python bench/cli_startup.py [--repeats 5] [--prompts 8]

Builds a tiny Hugging Face Llama (2 layers, d_model 32, the default model's
tokenizer) with two seeded SAEs (L0.resid_post, L1.z), runs two real jobs
on it (IOI prompts, embedded local Ray): a ``cache`` job (activations and
gradients, what ``query`` reads) and an ``attribute`` job (what ``results``
reads), each into a local store, then times whole ``circuitscan`` processes, each started afresh as a user
would (the installed entry point, median of ``--repeats`` runs):

- cli_query_seconds: ``circuitscan query STORE features-at --prompt 1 --position 3``
  (a point query; the figure the target is on),
- cli_top_examples_seconds: ``circuitscan query STORE top-examples --feature F``,
- cli_summary_seconds: ``circuitscan query STORE summary``,
- cli_results_seconds: ``circuitscan results STORE`` (the attribute job's store),
- cli_schema_seconds: ``circuitscan schema``,
- cli_help_seconds: ``circuitscan --help`` (the floor: interpreter + typer),
- cli_query_in_process_ms: the same point query in-process on an open store
  (what the process start costs on top of).

Ends with one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "2",
}.items():
    os.environ.setdefault(_name, _value)

SITE = "L0.resid_post"


def build_model_dirs(work: Path) -> tuple[Path, list[Path]]:
    """A tiny random Llama directory (real tokenizer) and two sae_lens SAE directories."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitscan.schemas.hooks import HookSite
    from circuitscan.schemas.models import ModelSpec
    from circuitscan.services.model_loading import load_model, load_tokenizer
    from circuitscan.testing.tiny_models import build_tiny_sae

    model_dir = work / "tiny_llama"
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model = load_model(ModelSpec(source=str(model_dir))).model
    sae_dirs = []
    for index, site in enumerate(
        [HookSite(layer=0, point="resid_post"), HookSite(layer=1, point="z")]
    ):
        sae = build_tiny_sae(model, site, d_sae=48, seed=index, dtype=torch.float32)
        path = work / f"sae_{site.label}"
        sae.save_model(path)
        sae_dirs.append(path)
    return model_dir, sae_dirs


def run_jobs(model_dir: Path, sae_dirs: list[Path], work: Path, n_prompts: int) -> None:
    """A cache job (into work/cache) and an attribute job (work/attribute) on local Ray."""
    import ray

    from circuitscan.schemas.jobs import (
        AttributeParams,
        CacheParams,
        ExecutionSpec,
        IOISource,
        JobSpec,
    )
    from circuitscan.schemas.models import ModelSpec, SAESpec
    from circuitscan.services.jobs.runner import run_job

    def spec(kind: str, job: CacheParams | AttributeParams) -> JobSpec:
        return JobSpec(
            name=f"cli-startup-{kind}",
            model=ModelSpec(source=str(model_dir)),
            saes=[SAESpec(source=str(path)) for path in sae_dirs],
            prompts=IOISource(kind="ioi", n=n_prompts, seed=0),
            job=job,
            store=str(work / kind),
            shard_size=4,
            execution=ExecutionSpec(num_actors=1, torch_threads=1, batch_size=4),
        )

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        run_job(spec("cache", CacheParams(kind="cache")), keep_actors=True)
        run_job(
            spec("attribute", AttributeParams(kind="attribute", method="atp", positions="last"))
        )
    finally:
        ray.shutdown()


def cli_command() -> list[str]:
    """The installed entry point next to this interpreter (else ``python -m``)."""
    script = Path(sys.executable).with_name("circuitscan")
    if script.is_file():
        return [str(script)]
    found = shutil.which("circuitscan")
    return [found] if found else [sys.executable, "-m", "circuitscan.services.cli"]


def time_command(args: list[str], repeats: int) -> tuple[float, str]:
    """Median wall seconds of ``repeats`` fresh processes, and the last one's stdout."""
    seconds = []
    out = ""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [*cli_command(), *args], capture_output=True, text=True, env=env, timeout=300
        )
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"circuitscan {' '.join(args)} failed:\n{done.stderr}")
        out = done.stdout
    return statistics.median(seconds), out


def in_process_query_ms(store: Path, repeats: int = 50) -> float:
    """Median in-process time of the point query on a store opened once."""
    from circuitscan.services.store import FeatureStore, features_at

    opened = FeatureStore.open(str(store))
    features_at(opened, SITE, 1, 3)  # first read decodes the shard's chunks
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        features_at(opened, SITE, 1, 3, limit=20)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Processes per command.")
    parser.add_argument("--prompts", type=int, default=8, help="IOI prompts in the store.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cli-startup-"))
    try:
        started = time.perf_counter()
        model_dir, sae_dirs = build_model_dirs(work)
        run_jobs(model_dir, sae_dirs, work, args.prompts)
        print(
            f"stores built by a cache and an attribute job in {time.perf_counter() - started:.1f}s"
        )

        url, store = str(work / "cache"), work / "cache"
        query_s, shown = time_command(
            ["query", url, "features-at", "--site", SITE, "--prompt", "1", "--position", "3"],
            args.repeats,
        )
        print(shown)
        feature = int(shown.splitlines()[3].split()[0])  # the query's first row
        figures = {
            "cli_query_seconds": query_s,
            "cli_top_examples_seconds": time_command(
                ["query", url, "top-examples", "--site", SITE, "--feature", str(feature)],
                args.repeats,
            )[0],
            "cli_summary_seconds": time_command(["query", url, "summary"], args.repeats)[0],
            "cli_results_seconds": time_command(["results", str(work / "attribute")], args.repeats)[
                0
            ],
            "cli_schema_seconds": time_command(["schema"], args.repeats)[0],
            "cli_help_seconds": time_command(["--help"], args.repeats)[0],
        }
        figures["cli_query_in_process_ms"] = in_process_query_ms(store)
        for name, value in figures.items():
            print(f"{name:28s} {value:8.3f}")
        result = {name: round(value, 4) for name, value in figures.items()}
        result.update(repeats=args.repeats, prompts=args.prompts, device="cpu")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
