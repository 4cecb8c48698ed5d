"""The ``circuitscan`` command line.

Errors a user can fix (bad spec, unreachable cluster, bad query) print one
clear message and exit 2, a damaged store exits 3 naming the damaged object
(:mod:`circuitscan.services.cli_errors`); tracebacks are for bugs only.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version as _dist_version
from pathlib import Path

import typer

from circuitscan.services.cli_errors import fail as _fail
from circuitscan.services.cli_errors import reported_errors
from circuitscan.services.output_folder import writing_into

app = typer.Typer(
    name="circuitscan",
    help="Distributed SAE activation cache and attribution service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the installed circuitscan version."""
    typer.echo(_dist_version("circuitscan"))


@app.command()
def schema() -> None:
    """Print the JSON Schema of job specs."""
    from circuitscan.schemas.jobs import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


@app.command()
def demo(
    prompts: int = typer.Option(16, help="Number of IOI prompts."),
    seed: int = typer.Option(0, help="Prompt generator seed."),
    out: Path = typer.Option(Path("runs/ioi-demo"), help="Folder for the stores and report."),
) -> None:
    """Run the end-to-end IOI story on the default model and SAEs (local Ray, local store)."""
    from circuitscan.services.demo import run_demo

    with reported_errors(), writing_into(out, "the demo's stores and report"):
        run_demo(n_prompts=prompts, seed=seed, out=out, echo=typer.echo)


@app.command()
def run(
    spec: Path | None = typer.Argument(None, help="Job spec file (YAML or JSON)."),
    spec_env: str | None = typer.Option(
        None, help="Read the spec JSON from this environment variable (used by `submit`)."
    ),
    address: str | None = typer.Option(
        None, help="Ray cluster address; default: $RAY_ADDRESS or an embedded local Ray."
    ),
    overwrite: bool = typer.Option(
        False,
        help="Replace a store that holds a different job (only that store's own objects "
        "are deleted; a folder holding anything else is refused).",
    ),
    summary_json: Path | None = typer.Option(
        None, help="Also write the job summary as JSON to this file (for scripts)."
    ),
    no_pool: bool = typer.Option(
        False,
        "--no-pool",
        help="Do not join the warm pool of `circuitscan up` (also: $CIRCUITSCAN_NO_POOL=1).",
    ),
) -> None:
    """Run a job spec on Ray and print a summary."""
    from circuitscan.services.jobs.spec_io import load_spec, parse_spec
    from circuitscan.services.pool_client import run_on_pool

    with reported_errors():
        if spec_env:
            job = parse_spec(os.environ.get(spec_env, ""), origin=f"${spec_env}")
        elif spec is not None:
            job = load_spec(spec)
        else:
            _fail("give a spec file or --spec-env")
        use_pool = False if no_pool else None
        # On a warm pool holding the job's model and SAEs, the pool's driver runs it
        # (this process then loads no model libraries); otherwise it runs here.
        pooled = run_on_pool(
            job, address=address, use_pool=use_pool, overwrite=overwrite, echo=typer.echo
        )
        if pooled is None:
            from circuitscan.services.jobs.runner import run_job

            summary = run_job(
                job, address=address, overwrite=overwrite, echo=typer.echo, use_pool=use_pool
            )
            pooled = summary.render(), summary.model_dump_json(indent=2)
    text, document = pooled
    if summary_json is not None:
        summary_json.write_text(document, encoding="utf-8")
    typer.echo(text)


@app.command()
def resume(
    store: str = typer.Argument(..., help="Store path or URL of an interrupted job."),
    address: str | None = typer.Option(None, help="Ray cluster address."),
    verify: bool = typer.Option(
        False,
        help="Also read every committed shard back against its checksums and recompute the "
        "damaged ones (downloads the whole store from object storage). Without it committed "
        "shards are trusted by their manifest entries and checked when read.",
    ),
    no_pool: bool = typer.Option(
        False, "--no-pool", help="Do not join the warm pool of `circuitscan up`."
    ),
) -> None:
    """Finish an interrupted job: recompute only its uncommitted (with --verify: or damaged) shards."""
    from circuitscan.services.jobs.runner import resume_job

    with reported_errors():
        summary = resume_job(
            store, address=address, echo=typer.echo, verify=verify,
            use_pool=False if no_pool else None,
        )  # fmt: skip
    typer.echo(summary.render())


@app.command()
def verify(
    store: str = typer.Argument(..., help="Store path or URL."),
    skip_shard_data: bool = typer.Option(
        False, help="Do not read the shards' bytes back (on object storage: a download)."
    ),
) -> None:
    """Check every object of a store against its checksums (read-only); exit 3 on damage."""
    from circuitscan.services.store.integrity import verify_store

    with reported_errors():
        report = verify_store(store, shard_data=not skip_shard_data)
    for line in report.render():
        typer.echo(line, err=not report.ok)
    if not report.ok:
        raise typer.Exit(3)


@app.command()
def repair(
    store: str = typer.Argument(..., help="Store path or URL of a job (finished or not)."),
    address: str | None = typer.Option(None, help="Ray cluster address (to recompute shards)."),
) -> None:
    """Repair what `verify` finds: rebuild the index, recompute damaged shards and results."""
    from circuitscan.services.jobs.repair import repair_store

    with reported_errors():
        report = repair_store(store, address=address, echo=typer.echo)
    for line in report.render():
        typer.echo(line, err=not report.ok)
    if not report.ok:
        raise typer.Exit(3)


def _job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _fail(f"cannot reach the Ray job server at {address}: {exc}")


@app.command()
def submit(
    spec: Path = typer.Argument(..., help="Job spec file (YAML or JSON)."),
    address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265."),
) -> None:
    """Submit a job to a Ray cluster through Ray's job submission; prints the job id."""
    from circuitscan.services.jobs.spec_io import load_spec

    with reported_errors():
        job = load_spec(spec)
    client = _job_client(address)
    env = {"CIRCUITSCAN_SPEC": job.model_dump_json()}
    for key in ("CIRCUITSCAN_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    job_id = client.submit_job(
        entrypoint="circuitscan run --spec-env CIRCUITSCAN_SPEC",
        runtime_env={"env_vars": env},
        metadata={"circuitscan_job": job.name, "store": job.store},
    )
    typer.echo(job_id)


@app.command()
def status(
    job_id: str = typer.Argument(..., help="Ray job id from `submit`."),
    address: str = typer.Option(..., help="Ray dashboard address."),
) -> None:
    """Show a submitted job's status."""
    client = _job_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as exc:
        _fail(str(exc))
        return
    typer.echo(f"{job_id}\t{info.status}\t{info.message or ''}")


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="Ray job id from `submit`."),
    address: str = typer.Option(..., help="Ray dashboard address."),
) -> None:
    """Print a submitted job's logs."""
    client = _job_client(address)
    try:
        typer.echo(client.get_job_logs(job_id))
    except RuntimeError as exc:
        _fail(str(exc))


@app.command()
def stop(
    job_id: str = typer.Argument(..., help="Ray job id from `submit`."),
    address: str = typer.Option(..., help="Ray dashboard address."),
) -> None:
    """Stop a submitted job (committed shards stay; `resume` finishes it later)."""
    client = _job_client(address)
    try:
        stopped = client.stop_job(job_id)
    except RuntimeError as exc:
        _fail(str(exc))
        return
    typer.echo("stopping" if stopped else "already finished")


@app.command()
def serve(
    store_root: str | None = typer.Option(
        None,
        help="Folder (or s3://BUCKET/PREFIX) of named stores; default "
        "$CIRCUITSCAN_API_STORE_ROOT or HOME/stores.",
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes."),
    ray_address: str | None = typer.Option(
        None, help="Ray dashboard address for jobs (default $CIRCUITSCAN_API_RAY_ADDRESS)."
    ),
    tokens_file: Path | None = typer.Option(
        None, help="File of API tokens, one a line (also: $CIRCUITSCAN_API_TOKENS)."
    ),
    protect_reads: bool | None = typer.Option(
        None, "--protect-reads/--open-reads", help="Require a token on read routes too."
    ),
    max_body_bytes: int | None = typer.Option(None, help="Largest request body (bytes)."),
    max_page_size: int | None = typer.Option(None, help="Largest page of any listing."),
) -> None:
    """Serve the HTTP API and the feature browser with uvicorn."""
    from circuitscan.services.api.serve import serve_api

    with reported_errors():
        serve_api(
            host=host,
            port=port,
            workers=workers,
            store_root=store_root,
            ray_address=ray_address,
            tokens_file=tokens_file,
            protect_reads=protect_reads,
            max_body_bytes=max_body_bytes,
            max_page_size=max_page_size,
        )


from circuitscan.services.analysis_commands import analyze_app  # noqa: E402

app.add_typer(analyze_app, name="analyze")


@app.command()
def report(
    store: str = typer.Argument(..., help="Store path or URL."),
    out: Path = typer.Option(..., help="Folder for index.html and its plots."),
    by: str | None = typer.Option(
        None,
        "--by",
        metavar="FIELD",
        help="Also break each job result down by this prompt field (as results --by).",
    ),
) -> None:
    """Write an offline HTML report of a store: cached features and any job results."""
    from circuitscan.services.query_commands import _decoder
    from circuitscan.services.store import FeatureStore
    from circuitscan.services.store_report import write_store_report

    with reported_errors():
        decode = _decoder(FeatureStore.open(store))
        with writing_into(out, "the report"):
            path = write_store_report(store, out, decode=decode, by=by)
    typer.echo(f"report: {path}")


@app.command()
def export(
    store: str = typer.Argument(..., help="Store path or URL (a cache store)."),
    out: Path = typer.Option(..., help="Folder to write the export into."),
    format: str = typer.Option("neuronpedia", "--format", help="Export format: neuronpedia."),
    model_id: str | None = typer.Option(
        None, "--model-id", help="Neuronpedia model id (default: the model folder's name)."
    ),
    source_set: str = typer.Option("circuitscan", "--source-set", help="Source-set name."),
    max_features: int | None = typer.Option(
        None, "--max-features", min=1, help="Only the most often active features per site."
    ),
) -> None:
    """Export a store's features (examples, histograms, logit effects) for Neuronpedia."""
    from circuitscan.services.neuronpedia_export import ExportError, export_neuronpedia
    from circuitscan.services.query_commands import _decoder
    from circuitscan.services.store import FeatureStore

    with reported_errors():
        if format != "neuronpedia":
            raise ExportError(f"unknown export format {format!r}; the one format is neuronpedia")
        decode = _decoder(FeatureStore.open(store))
        with writing_into(out, "the export"):
            folders = export_neuronpedia(
                store, out, model_id=model_id, source_set=source_set, decode=decode,
                max_features=max_features,
            )  # fmt: skip
    for folder in folders:
        typer.echo(f"neuronpedia export: {folder}")


from circuitscan.services.query_commands import register as _register_query_commands  # noqa: E402

_register_query_commands(app)

from circuitscan.services.pool_commands import register as _register_pool_commands  # noqa: E402

_register_pool_commands(app)

if __name__ == "__main__":
    app()
