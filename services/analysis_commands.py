"""``circuitscan analyze …``: the circuit analyses on any job prompt source, with JSON and HTML
reports.

Every analysis takes its prompts as a job spec does: ``--spec FILE`` (a job
spec's prompts, metric, model and SAEs), ``--prompts-file FILE`` (JSONL rows
as a ``jsonl`` source reads them, or a ``.txt`` file of lines), or, with
neither, seeded IOI prompts (``--prompts N --seed S``).

The work is done by :mod:`circuitscan.services.analysis_runs` (the analyses),
:mod:`~circuitscan.services.analysis_saving` (files, report, store) and
:mod:`~circuitscan.services.analysis_text` (terminal tables), imported on first
use so that ``circuitscan --help`` stays fast; their functions are also
reachable from here, e.g. ``from circuitscan.services.analysis_commands import
ioi_setup, run_dfa, save_outputs``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from circuitscan.services.cli_errors import reported_errors
from circuitscan.services.output_folder import writing_into

_RUNS = "circuitscan.services.analysis_runs"
_PROMPT_SETUP = "circuitscan.services.analysis_prompts"
_SAVING = "circuitscan.services.analysis_saving"
_TEXT = "circuitscan.services.analysis_text"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    for module in (_RUNS, _PROMPT_SETUP, _SAVING, _TEXT):
        found = importlib.import_module(module)
        if hasattr(found, name):
            return getattr(found, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- CLI ------------------------------------------------------------------------------

analyze_app = typer.Typer(
    help="Circuit analyses on any prompt source of a job spec (--spec FILE, --prompts-file "
    "FILE.jsonl; default: generated IOI): splice eval, head→feature→logit, DFA, QK pairs, the "
    "patch path of nodes attribution gets wrong, and a store's feature directions.",
    no_args_is_help=True,
)


@analyze_app.callback()
def _analyze_options(
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default: torch's own choice)."
    ),
) -> None:
    # On a busy small machine one thread is often several times faster than two:
    # OpenMP workers spin-wait for cores that other processes hold.
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


_OUT = typer.Option(None, "--out", help="Output directory (default: runs/analyses/<command>).")
_PROMPTS = typer.Option(
    None, "--prompts", help="IOI prompts generated (default 16), or the first N of a file, "
    "dataset or template source (default: all).")  # fmt: skip
_SEED = typer.Option(0, "--seed", help="IOI generator seed.")
_SPEC = typer.Option(
    None, "--spec", help="A job spec file: its prompts, metric, model and SAEs are used "
    "(--model/--sae override them).")  # fmt: skip
_PROMPTS_FILE = typer.Option(
    None, "--prompts-file", help="Prompt records, one JSON object a line (the jsonl source: "
    "text, answer, wrong, corrupted, template, positions, meta), or a .txt file of lines.")  # fmt: skip
_METRIC = typer.Option(
    None, "--metric", help="logit_diff (answer − wrong, the default), target_logprob or "
    "next_token_loss (default: the spec's).")  # fmt: skip
_STORE = typer.Option(None, "--store", help="Also write the JSON into this feature store.")
_MODEL = typer.Option(None, "--model", help="Model source (default: the default model).")
_SAES = typer.Option(None, "--sae", help="SAE source, repeatable (default: the default SAEs).")


def _runs() -> Any:
    return importlib.import_module(_RUNS)


def _position(text: str | None) -> str | int | None:
    return None if text is None else importlib.import_module(_PROMPT_SETUP).parse_position(text)


def _check_store(store: str | None) -> None:
    """Fail before any computation when --store names no existing feature store."""
    if store is not None:
        from circuitscan.services.store import FeatureStore

        FeatureStore.open(store)  # creates nothing: a typo leaves no folder behind


@dataclass(frozen=True)
class _Prompts:
    """The prompt options every analysis takes (see the module docstring)."""

    prompts: int | None
    seed: int
    spec: Path | None
    prompts_file: Path | None
    metric: str | None


def _run_command(
    command: str, out: Path | None, source: _Prompts, store: str | None,
    model: str | None, saes: list[str] | None, run: Callable[[Any], Any],
) -> None:  # fmt: skip
    from circuitscan.services.reports import report_sections

    prompts = importlib.import_module(_PROMPT_SETUP)
    out_dir = out or Path("runs") / "analyses" / command
    with reported_errors():
        if source.metric not in (None, "logit_diff", "target_logprob", "next_token_loss"):
            raise prompts.AnalysisInputError(
                f"--metric must be logit_diff, target_logprob or next_token_loss, "
                f"got {source.metric!r}"
            )
        _check_store(store)
        inputs = prompts.analysis_inputs(
            spec=source.spec, prompts_file=source.prompts_file, n_prompts=source.prompts,
            seed=source.seed, metric=source.metric,
        )  # fmt: skip
        # The folder is made (or refused) once the inputs are checked, before the model runs.
        with writing_into(out_dir, f"the {command} outputs"):
            setup = prompts.prompt_setup(inputs, model_source=model, sae_sources=saes)
            output = run(setup)
            sections = report_sections(out_dir, **{_SECTION_ARG[output.kind]: output})
            title = f"{command} ({setup.context.model})"
            index = importlib.import_module(_SAVING).save_outputs(
                out_dir, [output], sections, title, store
            )
    typer.echo(importlib.import_module(_TEXT).summary_lines(output))
    typer.echo(f"wrote {out_dir / (output.kind + '.json')} and {index}")


_SECTION_ARG = {"splice_eval": "splice", "head_feature_logit": "hfl", "dfa": "dfa",
                "qk_pairs": "qk", "patch_path": "path"}  # fmt: skip


@analyze_app.command("splice-eval")
def splice_eval_command(
    out: Path | None = _OUT, prompts: int | None = _PROMPTS, seed: int = _SEED,
    spec: Path | None = _SPEC, prompts_file: Path | None = _PROMPTS_FILE,
    metric: str | None = _METRIC,
    store: str | None = _STORE, model: str | None = _MODEL, sae: list[str] | None = _SAES,
    sets: list[str] | None = typer.Option(
        None, "--set", help="Sites spliced together, '+'-joined (e.g. L15.z+L15.resid_post); "
        "repeatable. Default: each SAE alone, then all together."),
) -> None:  # fmt: skip
    """Metric and KL with SAE reconstructions spliced in, beside mean and error-only ablation."""
    layer_sets = [s.split("+") for s in sets] if sets else None
    _run_command("splice-eval", out, _Prompts(prompts, seed, spec, prompts_file, metric),
                 store, model, sae,
                 lambda s: _runs().run_splice_eval(s, layer_sets=layer_sets))  # fmt: skip


@analyze_app.command("head-feature-logit")
def head_feature_logit_command(
    out: Path | None = _OUT, prompts: int | None = _PROMPTS, seed: int = _SEED,
    spec: Path | None = _SPEC, prompts_file: Path | None = _PROMPTS_FILE,
    metric: str | None = _METRIC,
    store: str | None = _STORE, model: str | None = _MODEL, sae: list[str] | None = _SAES,
    site: str | None = typer.Option(None, help="Residual SAE site (default: the first)."),
    feature: int | None = typer.Option(None, help="Feature (default: top attribution at src)."),
    prompt_index: int = typer.Option(0, help="Prompt whose scales and answer tokens are used."),
    src: str | None = typer.Option(None, help="Source position of the feature: a name the "
        "prompts carry, an index (BOS 0) or last (default: IO if named, else last)."),
    dest: str | None = typer.Option(None, help="Destination position (default: END if named, "
        "else the metric's position)."),
) -> None:  # fmt: skip
    """Every downstream head's direct effect on logit(answer) − logit(wrong) through one
    feature: per unit of it at full attention, and the prompt's own (× activation × attention)."""
    _run_command("head-feature-logit", out, _Prompts(prompts, seed, spec, prompts_file, metric),
                 store, model, sae,
                 lambda s: _runs().run_head_feature_logit(
                     s, site=site, feature=feature, prompt_index=prompt_index,
                     src=_position(src), dest=_position(dest)))  # fmt: skip


@analyze_app.command("dfa")
def dfa_command(
    out: Path | None = _OUT, prompts: int | None = _PROMPTS, seed: int = _SEED,
    spec: Path | None = _SPEC, prompts_file: Path | None = _PROMPTS_FILE,
    metric: str | None = _METRIC,
    store: str | None = _STORE, model: str | None = _MODEL, sae: list[str] | None = _SAES,
    site: str | None = typer.Option(None, help="hook_z SAE site (default: the first)."),
    feature: int | None = typer.Option(None, help="Feature (default: top |attribution| at dest)."),
    prompt_index: int = typer.Option(0, help="Prompt to analyse."),
    dest: str | None = typer.Option(None, help="Destination position: a name, an index (BOS 0) "
        "or last (default: END if named, else the metric's position)."),
    depth: int = typer.Option(3, help="Recursive DFA depth."),
    top_k: int = typer.Option(6, help="Children kept per node."),
    min_frac: float = typer.Option(0.05, help="Expand children ≥ this fraction of the parent."),
) -> None:  # fmt: skip
    """Direct feature attribution by head and source, and its recursive tree."""
    from circuitscan.pipelines.analyses import Pruning

    pruning = Pruning(max_depth=depth, top_k=top_k, min_frac=min_frac)
    _run_command("dfa", out, _Prompts(prompts, seed, spec, prompts_file, metric),
                 store, model, sae,
                 lambda s: _runs().run_dfa(
                     s, site=site, feature=feature, prompt_index=prompt_index,
                     pruning=pruning, dest=_position(dest)))  # fmt: skip


@analyze_app.command("qk-pairs")
def qk_pairs_command(
    out: Path | None = _OUT, prompts: int | None = _PROMPTS, seed: int = _SEED,
    spec: Path | None = _SPEC, prompts_file: Path | None = _PROMPTS_FILE,
    metric: str | None = _METRIC,
    store: str | None = _STORE, model: str | None = _MODEL, sae: list[str] | None = _SAES,
    site: str | None = typer.Option(None, help="Residual SAE site (default: the first)."),
    head: int | None = typer.Option(None, help="Head (default: most attention dest→src)."),
    dest: str | None = typer.Option(None, help="Destination position: a name (IOI: IO, S1, S2, "
        "END), an index (BOS 0) or last (default S2; needed where prompts lack it)."),
    src: str | None = typer.Option(None, help="Source position (default S1)."),
    top_n: int = typer.Option(20, help="Top pairs for the variance curve."),
) -> None:  # fmt: skip
    """An attention score split into (query feature, key feature) pairs, and variance explained."""
    _run_command("qk-pairs", out, _Prompts(prompts, seed, spec, prompts_file, metric),
                 store, model, sae,
                 lambda s: _runs().run_qk_pairs(
                     s, site=site, head=head, dest=_position(dest), src=_position(src),
                     top_n=top_n))  # fmt: skip


@analyze_app.command("patch-path")
def patch_path_command(
    nodes: list[str] = typer.Argument(
        ..., help="Nodes, e.g. v:L16:0@S1 z:L19:2@END feature:L15.resid_post:302@S2."),
    out: Path | None = _OUT, prompts: int | None = _PROMPTS, seed: int = _SEED,
    spec: Path | None = _SPEC, prompts_file: Path | None = _PROMPTS_FILE,
    metric: str | None = _METRIC,
    store: str | None = _STORE, model: str | None = _MODEL, sae: list[str] | None = _SAES,
    fraction: list[float] | None = typer.Option(
        None, "--fraction", help="Partial-patch fraction in (0, 1], repeatable "
        "(default 0.05, 0.25, 0.5, 0.75)."),
) -> None:  # fmt: skip
    """Why AtP/AtP* and exact patching disagree on nodes: frozen-pattern and partial patches."""
    from circuitscan.schemas.attribution import Node

    try:  # before the model loads: a typo should not cost a minute
        for text in nodes:
            Node.parse(text)
        for value in fraction or []:
            if not 0.0 < value <= 1.0:
                raise ValueError(f"--fraction must be in (0, 1], got {value}")
    except ValueError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    _run_command("patch-path", out, _Prompts(prompts, seed, spec, prompts_file, metric),
                 store, model, sae,
                 lambda s: _runs().run_patch_path(s, nodes, fractions=fraction))  # fmt: skip


@analyze_app.command("ioi-report")
def ioi_report_command(
    out: Path = typer.Option(Path("runs/analyses/ioi-report"), "--out", help="Output directory."),
    prompts: int = typer.Option(12, "--prompts", help="Number of IOI prompts."),
    seed: int = _SEED, store: str | None = _STORE,
) -> None:  # fmt: skip
    """All four analyses on the default model and SAEs: one HTML report with every plot."""
    runs = _runs()
    with reported_errors():
        _check_store(store)
        with writing_into(out, "the ioi-report outputs"):
            _, outputs = runs.run_ioi_report(out, n_prompts=prompts, seed=seed, store=store,
                                             echo=typer.echo)  # fmt: skip
    for output in outputs:
        typer.echo(importlib.import_module(_TEXT).summary_lines(output))


@analyze_app.command("feature-directions")
def feature_directions_command(
    store: str = typer.Argument(..., help="A cache store (path, memory://NAME or s3://…)."),
    k: int = typer.Option(10, "--top-k", min=1, help="Promoted / suppressed tokens per feature."),
    heads: int = typer.Option(5, "--heads", min=1, help="Reading heads kept per feature."),
) -> None:
    """Logit effects (W_U·norm(d̂)) and reading heads of every feature, kept in the store."""
    with reported_errors():
        run = importlib.import_module("circuitscan.services.feature_directions_run")
        sites = run.directions_from_spec(store, k=k, heads=heads)
    typer.echo(f"wrote feature directions of {', '.join(sites) or 'no site'} into {store}")
