"""``circuitscan query`` and ``circuitscan results``: a store's contents as terminal tables.

Registered on the main CLI app by :func:`register`. These commands read a
store and never import torch or Ray (tokens are decoded with ``tokenizers``
alone where that is exact), so a point query costs well under two seconds
as a whole process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, NoReturn

import typer

from circuitscan.services.cli_errors import reported_errors


class QueryKind(StrEnum):
    features_at = "features-at"
    top_examples = "top-examples"
    summary = "summary"
    top_attributions = "top-attributions"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns; floats with 4 significant decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _decoder(store: Any) -> Callable[[Sequence[int]], list[str]] | None:
    """Token decoder of the store's model (None when its tokenizer cannot be loaded here)."""
    from circuitscan.schemas.models import ModelSpec
    from circuitscan.services.token_decoding import token_decoder

    spec = (store.layout.job_spec or {}).get("model")
    try:
        return token_decoder(ModelSpec.model_validate(spec) if spec else None)
    except Exception:  # decoding is a convenience: ids are printed instead
        return None


def _need(**values: Any) -> None:
    missing = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is None]
    if missing:
        _fail(f"this query needs {', '.join(missing)}")


def _resolve_site(store: Any, site: str | None) -> str:
    """The asked site, or the store's only site; a clear error when a choice is needed."""
    labels = [s.label for s in store.layout.sites]
    if site is not None:
        store.layout.site(site)
        return site
    if len(labels) == 1:
        return labels[0]
    if not labels:
        kind = (store.layout.job_spec or {}).get("job", {}).get("kind", "?")
        _fail(
            f"this store holds no cached SAE features, only a job result ({kind}): "
            f"`circuitscan results {store.url}` prints it"
        )
    _fail(f"this store has sites {', '.join(labels)}: choose one with --site")


def _at_least(least: int, **counts: int) -> None:
    """Refuse a count option below ``least`` (a negative --limit would drop rows silently)."""
    for name, value in counts.items():
        if value < least:
            _fail(f"--{name} must be at least {least}, got {value}")


def _overview(store: Any) -> str:
    store.manifest.raise_if_damaged()  # the counts below would be silently short
    layout = store.layout
    spec = layout.job_spec or {}
    rows = [
        ("job", f"{spec.get('name', '?')} ({spec.get('job', {}).get('kind', '?')})"),
        ("job hash", layout.job_hash),
        ("shards committed", len(store.committed_shard_ids())),
        ("prompts", store.n_prompts()),
        ("tokens", store.n_tokens()),
        ("sites", ", ".join(f"{s.label} (d_sae {s.d_sae})" for s in layout.sites) or "-"),
        ("gradients", layout.gradients),
        ("value dtype", layout.value_dtype),
    ]
    return table(["field", "value"], rows)


def _top_attributions(
    store: Any, site: str, feature: int | None, per: str | None, n: int, rank_by: str
) -> str:
    """A top-attributions ranking as a header line and a table (from the index alone)."""
    from circuitscan.services.store.rankings import RANK_BY, RANK_PER, top_attributions

    chosen = per or ("feature" if feature is None else "prompt")
    if chosen not in RANK_PER:
        _fail(f"--per must be one of {', '.join(RANK_PER)}")
    if rank_by not in RANK_BY:
        _fail(f"--rank-by must be one of {', '.join(RANK_BY)}")
    ranking = top_attributions(
        store,
        site,
        per=chosen,  # type: ignore[arg-type]
        feature=feature,
        n=n,
        rank_by=rank_by,  # type: ignore[arg-type]
    )
    rows: list[tuple[Any, ...]]
    if chosen == "feature":
        key = {"sum": "|Σ a·g|", "abs": "Σ |a·g|", "atp": "|Σ AtP|", "atp_abs": "Σ |AtP|"}
        header = f"features of {site} by {key[rank_by]} over {ranking.n_tokens} tokens"
        headers = ["feature", "sum_attribution", "sum_abs", "entries"]
        rows = [(r.feature, r.value, r.value_abs, r.count) for r in ranking.rows]
        if ranking.error_atp is not None:  # a paired cache: the AtP term (a' − a)·g too
            headers += ["sum_atp", "sum_abs_atp"]
            rows = [(*row, r.atp, r.atp_abs) for row, r in zip(rows, ranking.rows, strict=True)]
            header += f"; error node Σ AtP {ranking.error_atp:.4g}"
    elif chosen == "position":
        header = f"feature {feature} of {site}: its (prompt, position) entries by |a·g|"
        headers = ["prompt", "position", "attribution"]
        rows = [(r.prompt, r.position, r.value) for r in ranking.rows]
    else:
        header = f"feature {feature} of {site}: its prompts by |Σ a·g| over their positions"
        headers = ["prompt", "attribution"]
        rows = [(r.prompt, r.value) for r in ranking.rows]
    shown = f"{len(ranking.rows)} of {ranking.available}"
    return f"{header} ({shown}; a·g = activation × ∂metric/∂activation)\n" + table(headers, rows)


def query(
    store_url: str = typer.Argument(..., metavar="STORE", help="Store path or URL."),
    what: QueryKind = typer.Argument(
        ..., help="features-at, top-examples, summary or top-attributions."
    ),
    site: str | None = typer.Option(
        None, help="Site label, e.g. L6.z (default: the store's only site)."
    ),
    prompt: int | None = typer.Option(None, help="Prompt index (features-at)."),
    position: int | None = typer.Option(None, help="Token position, BOS = 0 (features-at)."),
    feature: int | None = typer.Option(None, help="Feature id (top-examples, summary)."),
    n: int = typer.Option(10, help="How many examples (top-examples)."),
    context: int = typer.Option(6, help="Context tokens on each side (top-examples)."),
    limit: int = typer.Option(20, help="Rows at most (features-at)."),
    sort_by: str = typer.Option("attribution", help="attribution or activation (features-at)."),
    decode: bool = typer.Option(True, help="Decode token ids with the store's tokenizer."),
    per: str | None = typer.Option(
        None,
        help="top-attributions: feature (features over the store; the default without "
        "--feature), prompt (a feature's prompts; the default with it) or position.",
    ),
    rank_by: str = typer.Option(
        "sum",
        help="top-attributions per feature: sum (|Σ a·g|), abs (Σ |a·g|), or in a paired "
        "cache atp (|Σ (a' − a)·g|) or atp_abs (Σ |(a' − a)·g|).",
    ),
) -> None:
    """Query a feature store: active features at a token, top examples, summaries, and
    corpus-wide rankings by attribution a·∂m/∂a (top-attributions)."""
    from circuitscan.services.store import (
        FeatureStore,
        feature_summary,
        features_at,
        top_examples,
    )

    _at_least(1, n=n, limit=limit)
    _at_least(0, context=context)
    with reported_errors():
        store = FeatureStore.open(store_url)
        if what is QueryKind.summary and feature is None:
            typer.echo(_overview(store))
            return
        site = _resolve_site(store, site)
        if what is QueryKind.top_attributions:
            typer.echo(_top_attributions(store, site, feature, per, n, rank_by))
            return
        if what is QueryKind.features_at:
            _need(prompt=prompt, position=position)
            if sort_by not in ("attribution", "activation"):
                _fail("--sort-by must be attribution or activation")
            found = features_at(
                store,
                site,
                prompt,
                position,
                sort_by=sort_by,
                limit=limit,  # type: ignore[arg-type]
            )
            decoder = _decoder(store) if decode else None
            token = decoder([found.token_id])[0] if decoder else found.token_id
            typer.echo(
                f"prompt {prompt} position {position} token {token!r} site {site} "
                f"error norm {found.error_norm:.4g}"
            )
            grads = found.gradients or [None] * len(found.feature_ids)
            attrs = found.attributions or [None] * len(found.feature_ids)
            rows = list(zip(found.feature_ids, found.activations, grads, attrs, strict=True))
            typer.echo(table(["feature", "activation", "gradient", "attribution"], rows))
        elif what is QueryKind.top_examples:
            _need(feature=feature)
            assert feature is not None
            decoder = _decoder(store) if decode else None
            examples = top_examples(store, site, feature, n, context=context, decode=decoder)
            rows = []
            for ex in examples:
                pieces = ex.context or [str(t) for t in ex.context_token_ids]
                marked = [f"[[{p}]]" if i == ex.hit_index else p for i, p in enumerate(pieces)]
                text = "".join(marked) if ex.context else " ".join(marked)
                rows.append((ex.prompt, ex.position, ex.activation, text.replace("\n", "\\n")))
            typer.echo(table(["prompt", "position", "activation", "context"], rows))
        else:
            assert feature is not None
            s = feature_summary(store, site, feature)
            headers = ["site", "feature", "count", "total", "max", "mean_active", "frequency"]
            values = (s.site, s.feature, s.count, s.total, s.max, s.mean_when_active, s.frequency)
            typer.echo(table(headers, [values]))


def results(
    store_url: str = typer.Argument(..., metavar="STORE", help="Store path or URL."),
    kind: str | None = typer.Option(None, help="Result kind when the store holds several."),
    top: int = typer.Option(20, help="Rows at most."),
    as_json: bool = typer.Option(False, "--json", help="Print the result document as JSON."),
    by: str | None = typer.Option(
        None,
        "--by",
        metavar="FIELD",
        help="Break the result down by a prompt field: template, answer, wrong, corrupted, "
        "text or a meta key (a JSONL row's meta: {group: …}); per-group means of the "
        "per-prompt values.",
    ),
) -> None:
    """Print a job's aggregated result (attribute, ablation_scan, splice_eval or dfa)."""
    from circuitscan.services.jobs.kinds import job_kind
    from circuitscan.services.store.results import read_result

    _at_least(1, top=top)
    with reported_errors():
        result = read_result(store_url, kind)
        if by is not None:
            from circuitscan.services.jobs.breakdown import breakdown_table
            from circuitscan.services.store import FeatureStore

            grouped = job_kind(result.kind).breakdown(FeatureStore.open(store_url), result, by, top)
    if by is not None:
        if as_json:
            typer.echo(json.dumps(grouped.model_dump(mode="json"), indent=2))
            return
        sizes = ", ".join(f"{g.value}: {g.n_prompts}" for g in grouped.groups)
        typer.echo(
            f"{result.kind} by {by}: {len(grouped.groups)} groups over {grouped.n_prompts} "
            f"prompts ({sizes}); per-group means, n = prompts where the item exists"
        )
        for name, meaning in grouped.quantities.items():
            typer.echo(f"  {name}: {meaning}")
        columns, rows = breakdown_table(grouped)
        typer.echo(table(columns, rows))
        return
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
        return
    view = job_kind(result.kind).cli_view(result, top)
    typer.echo(view.header)
    typer.echo(table(view.columns, view.rows))


def register(app: typer.Typer) -> None:
    """Add ``query`` and ``results`` to the main CLI."""
    app.command("query")(query)
    app.command("results")(results)
