"""The ``circuitscan`` command line."""

from __future__ import annotations

from importlib.metadata import version as _dist_version

import typer

app = typer.Typer(
    name="circuitscan",
    help="Distributed SAE activation cache and attribution service.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the installed circuitscan version."""
    typer.echo(_dist_version("circuitscan"))


@app.command()
def demo(
    prompts: int = typer.Option(8, help="Number of IOI prompts."),
    seed: int = typer.Option(0, help="Prompt generator seed."),
) -> None:
    """Run the end-to-end job on the default model and SAEs."""
    from circuitscan.services.demo import run_demo

    run_demo(n_prompts=prompts, seed=seed, echo=typer.echo)


if __name__ == "__main__":
    app()
