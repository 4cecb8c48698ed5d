"""``circuitscan up`` / ``circuitscan down``: the warm local pool from the command line.

``up [SPEC]`` starts a local Ray head whose actors load a model and SAEs once
(a spec's, or ``--model``/``--sae``, default: the embedded defaults) and keep
them; every later ``circuitscan run``/``resume`` on this machine joins it
(``--no-pool`` or ``$CIRCUITSCAN_NO_POOL=1``: not) and, when the job names the
same model and SAEs, starts its shards on them at once. ``down`` stops what
``up`` started, and nothing else. ``up --status`` says what runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from circuitscan.services.cli_errors import fail, reported_errors


def _shipped_sae_names() -> list[str]:
    """The default model's shipped SAEs, read from their folder (as ``sae_loading`` lists
    them, without importing sae_lens into this process)."""
    root = Path(__file__).resolve().parent / "default_saes"
    if not root.is_dir():
        return []
    return sorted(path.name for path in root.iterdir() if (path / "cfg.json").is_file())


def _pool_spec(spec: Path | None, model: str | None, saes: list[str] | None, threads: int | None):
    from circuitscan.schemas.jobs import CacheParams, ExecutionSpec, IOISource, JobSpec
    from circuitscan.schemas.models import DEFAULT_MODEL, ModelSpec, SAESpec
    from circuitscan.services.jobs.spec_io import load_spec

    if spec is not None:
        if model is not None or saes:
            fail("give a spec file or --model/--sae, not both")
        job = load_spec(spec)
        if threads is not None:
            execution = job.execution.model_copy(update={"torch_threads": threads})
            job = job.model_copy(update={"execution": execution})
        return job
    model_spec = ModelSpec(source=model) if model else ModelSpec()
    if saes is None or not saes:
        if model_spec.source == DEFAULT_MODEL:
            saes = [f"default/{name}" for name in _shipped_sae_names()]
        else:
            saes = []
    # The actors only load the model and SAEs of this spec: its prompts and job are
    # placeholders that nothing runs.
    return JobSpec(
        name="warm-pool",
        model=model_spec,
        saes=[SAESpec(source=source) for source in saes],
        prompts=IOISource(kind="ioi", n=1, seed=0),
        job=CacheParams(kind="cache"),
        store="memory://warm-pool",
        execution=ExecutionSpec(torch_threads=threads or 1),
    )


def up(
    spec: Path | None = typer.Argument(
        None, help="Job spec (YAML/JSON) whose model and SAEs the actors load."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model source (default: the embedded default model)."
    ),
    sae: list[str] | None = typer.Option(
        None, "--sae", help="SAE source, repeatable (default model: its shipped SAEs)."
    ),
    actors: int | None = typer.Option(
        None, "--actors", min=1, help="Actors to start (default: one per GPU, else per CPU slot)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads per CPU actor (default: the spec's, or 1)."
    ),
    num_cpus: int | None = typer.Option(None, "--num-cpus", min=1, help="CPUs the head offers."),
    object_store_mb: int | None = typer.Option(
        None, "--object-store-mb", min=50, help="Ray object store size (MB; default Ray's)."
    ),
    status: bool = typer.Option(False, "--status", help="Only say what runs, start nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --status: the status as JSON."),
) -> None:
    """Start a warm local pool: a Ray head whose actors keep the model and SAEs loaded."""
    from circuitscan.services.jobs import pool_lifecycle
    from circuitscan.services.jobs.warm_pool import describe_record

    with reported_errors():
        if status:
            report = pool_lifecycle.pool_status()
            if as_json:
                typer.echo(json.dumps(report, indent=2))
                return
            record = report["record"]
            if record is None:
                typer.echo(f"no warm pool (no pool file at {report['pool_file']})")
                return
            state = "running" if report["running"] else "recorded but not running"
            typer.echo(f"warm pool at {record['address']}: {state} (since {record['started_at']})")
            for actor in report["actors"]:
                typer.echo(
                    f"  actor pid {actor['pid']}: model loads {actor['model_loads']}, "
                    f"shards {actor['shards']}, jobs {actor['jobs']}"
                )
            return
        job = _pool_spec(spec, model, sae, threads)
        started = pool_lifecycle.start_pool(
            job, n_actors=actors, num_cpus=num_cpus, object_store_mb=object_store_mb,
            echo=typer.echo,
        )  # fmt: skip
    typer.echo(
        f"warm pool up at {started.address}: {describe_record(started)}; "
        "`circuitscan run` uses it, `circuitscan down` stops it"
    )


def down() -> None:
    """Stop the warm pool `circuitscan up` started (its recorded processes, nothing else)."""
    from circuitscan.services.jobs import pool_lifecycle
    from circuitscan.services.jobs.warm_pool import pool_file

    with reported_errors():
        stopped = pool_lifecycle.stop_pool()
    if stopped is None:
        typer.echo(f"no warm pool to stop (no pool file at {pool_file()})")
        return
    record, count = stopped
    typer.echo(f"warm pool at {record.address} stopped ({count} process(es) ended)")


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(down)
