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


if __name__ == "__main__":
    app()
