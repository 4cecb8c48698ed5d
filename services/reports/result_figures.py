"""The figures of a store's job results, as inline SVG (``svg.py``), for report and browser alike.

- attribute: a layer × head heatmap per head node kind (z/q/k/v) and position
  (role), the estimate beside the exact Δm where nodes were verified; the
  AtP-vs-exact scatter; bars of the top feature nodes per SAE site and of the
  other nodes (error terms, MLPs, neurons);
- ablation_scan: per feature, the distribution of Δm over the prompts (read
  from the shards' partials), largest mean |Δm| first;
- dfa: feature × head and feature × source role heatmaps.

Every node element links through ``link(node)``: feature nodes to their
feature page, head nodes to their head, whatever the caller makes of them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.attribution import Node
from circuitscan.schemas.job_results import AblationJobResult, AttributionJobResult, DFAJobResult
from circuitscan.services.reports.svg import Link, bar_chart, heatmap, scatter, strips
from circuitscan.services.store.feature_store import FeatureStore
from circuitscan.services.store.results import list_results, read_result

HEAD_KINDS = ("z", "q", "k", "v")
FEATURE_BARS = 20


class SvgFigure(BaseModel):
    """One figure of a store's results."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str = Field(description="Job result kind the figure belongs to.")
    name: str = Field(description="Figure name, unique within the store.")
    title: str = Field(description="Figure title.")
    svg: str = Field(description="Inline SVG markup (no scripts, no external references).")


def feature_node(site: str, feature: int) -> str:
    """The link key of a feature page (a feature node's form without its position)."""
    return f"feature:{site}:{feature}"


def head_node(layer: int, head: int) -> str:
    """The link key of a head page."""
    return f"head:L{layer}:{head}"


def link_key(node: str) -> str | None:
    """A node string's page: its feature or its head (None for other kinds)."""
    if node.startswith(("feature:", "head:")) and "@" not in node:
        return node
    try:
        parsed = Node.parse(node)
    except ValueError:
        return None
    if parsed.kind == "feature" and parsed.index is not None:
        return feature_node(parsed.site.label, parsed.index)
    if parsed.kind in HEAD_KINDS and parsed.index is not None:
        return head_node(parsed.layer, parsed.index)
    return None


@dataclass(frozen=True)
class _Scored:
    node: Node
    text: str
    estimate: float
    exact: float | None


def _scored(result: AttributionJobResult) -> list[_Scored]:
    out = []
    for effect in result.top:
        try:
            node = Node.parse(effect.node)
        except ValueError:
            continue
        exact = effect.verification.exact_mean if effect.verification is not None else None
        out.append(_Scored(node, effect.node, effect.mean, exact))
    return out


def _linker(link: Link | None) -> Link | None:
    if link is None:
        return None

    def through(node: str) -> str | None:
        key = link_key(node)
        return link(key) if key is not None else None

    return through


def attribution_figures(result: AttributionJobResult, link: Link | None) -> list[SvgFigure]:
    """Head heatmaps per (kind, position), the AtP-vs-exact scatter, feature bars per site."""
    nodes = _scored(result)
    through = _linker(link)
    figures: list[SvgFigure] = []
    groups: dict[tuple[str, str], list[_Scored]] = defaultdict(list)
    for item in nodes:
        if item.node.kind in HEAD_KINDS:
            groups[(item.node.kind, str(item.node.position))].append(item)
    for (kind, position), items in sorted(groups.items()):
        layers = sorted({i.node.layer for i in items})
        n_heads = max(int(i.node.index or 0) for i in items) + 1
        cells = {(i.node.layer, int(i.node.index or 0)): i for i in items}
        columns = [str(h) for h in range(n_heads)]
        rows = [f"L{layer}" for layer in layers]
        names = [[cells[(la, h)].text if (la, h) in cells else None for h in range(n_heads)]
                 for la in layers]  # fmt: skip
        shown = [("estimate", lambda i: i.estimate)]
        if any(i.exact is not None for i in items):
            shown.append(("exact", lambda i: i.exact))
        for label, value in shown:
            grid = [[value(cells[(la, h)]) if (la, h) in cells else None for h in range(n_heads)]
                    for la in layers]  # fmt: skip
            title = f"{kind} @ {position}: {label} ({result.method})"
            svg = heatmap(f"heads-{label}", title, rows, columns, grid, nodes=names, link=through)
            figures.append(SvgFigure(kind="attribute", name=f"heads-{kind}-{position}-{label}",
                                     title=title, svg=svg))  # fmt: skip
    verified = [i for i in nodes if i.exact is not None]
    if verified:
        title = f"{result.method} estimate vs exact Δm ({len(verified)} verified nodes)"
        svg = scatter(
            "atp-vs-exact", title, [i.exact or 0.0 for i in verified],
            [i.estimate for i in verified], nodes=[i.text for i in verified], link=through,
            xlabel="exact Δm", ylabel="estimate",
        )  # fmt: skip
        figures.append(SvgFigure(kind="attribute", name="atp-vs-exact", title=title, svg=svg))
    by_site: dict[str, list[_Scored]] = defaultdict(list)
    others: list[_Scored] = []
    for item in nodes:
        if item.node.kind == "feature":
            by_site[item.node.site.label].append(item)
        elif item.node.kind not in HEAD_KINDS:
            others.append(item)
    for site, items in sorted(by_site.items()):
        items = sorted(items, key=lambda i: -abs(i.estimate))[:FEATURE_BARS]
        title = f"feature nodes at {site}: mean estimate"
        svg = bar_chart(
            "feature-bars", title, [i.text for i in items], [i.estimate for i in items],
            nodes=[i.text for i in items], link=through,
        )  # fmt: skip
        figures.append(SvgFigure(kind="attribute", name=f"features-{site}", title=title, svg=svg))
    if others:
        items = sorted(others, key=lambda i: -abs(i.estimate))[:FEATURE_BARS]
        title = "other nodes (SAE error, MLP, neuron): mean estimate"
        svg = bar_chart("node-bars", title, [i.text for i in items], [i.estimate for i in items])
        figures.append(SvgFigure(kind="attribute", name="other-nodes", title=title, svg=svg))
    return figures


def ablation_figures(
    store: FeatureStore, result: AblationJobResult, link: Link | None, top: int = FEATURE_BARS
) -> list[SvgFigure]:
    """Per feature (largest mean |Δm| first) its Δm on every prompt it was ablated on."""
    from circuitscan.services.jobs.job_kind import committed_partials
    from circuitscan.services.jobs.kinds.ablation_scan import AblationPartial

    chosen = [f.feature for f in result.features[:top]]
    samples: dict[int, list[float]] = {f: [] for f in chosen}
    for partial in committed_partials(store, AblationPartial):
        columns = {int(f): j for j, f in enumerate(partial.features.tolist())}
        for feature in chosen:
            if feature in columns:
                column = partial.dense_delta()[:, columns[feature]]
                samples[feature] += [float(v) for v in column if v == v]  # NaN: not ablated
    keys = [feature_node(result.site, f) for f in chosen]
    if not any(samples.values()):  # no shard partials (a result written on its own): the means
        title = f"{result.mode} ablation at {result.site}: mean Δm ({result.n_prompts} prompts)"
        means = [f.mean_delta for f in result.features[:top]]
        svg = bar_chart("ablation-means", title, [f"f{f}" for f in chosen], means, nodes=keys,
                        link=link)  # fmt: skip
        return [SvgFigure(kind="ablation_scan", name="ablation-means", title=title, svg=svg)]
    title = f"{result.mode} ablation at {result.site}: Δm per prompt ({result.n_prompts} prompts)"
    svg = strips(
        "ablation-deltas", title, [f"f{f}" for f in chosen], [samples[f] for f in chosen],
        nodes=keys, link=link,
    )  # fmt: skip
    return [SvgFigure(kind="ablation_scan", name="ablation-deltas", title=title, svg=svg)]


def dfa_figures(result: DFAJobResult, link: Link | None) -> list[SvgFigure]:
    """Feature × head and feature × source-role means of the DFA split."""
    features = result.features
    if not features:
        return []
    rows = [f"f{f.feature}" for f in features]
    keys = [feature_node(result.site, f.feature) for f in features]
    n_heads = max(len(f.head_means) for f in features)
    heads = [[f.head_means[h] if h < len(f.head_means) else None for h in range(n_heads)]
             for f in features]  # fmt: skip
    roles = sorted({role for f in features for role in f.source_means})
    by_role = [[f.source_means.get(role) for role in roles] for f in features]
    out = []
    for name, columns, grid in (("head", [str(h) for h in range(n_heads)], heads),
                                ("source", roles, by_role)):  # fmt: skip
        title = f"DFA at {result.site} @ {result.position}: feature × {name}"
        nodes = [[key] * len(columns) for key in keys]
        svg = heatmap(f"dfa-{name}", title, rows, columns, grid, nodes=nodes, link=link, cell=34)
        out.append(SvgFigure(kind="dfa", name=f"dfa-{name}", title=title, svg=svg))
    return out


def result_figures(store: FeatureStore, link: Link | None = None) -> list[SvgFigure]:
    """Every figure of the job results the store holds (kinds without figures give none)."""
    figures: list[SvgFigure] = []
    for info in list_results(store):
        result = read_result(store, info.kind)
        if isinstance(result, AttributionJobResult):
            figures += attribution_figures(result, link)
        elif isinstance(result, AblationJobResult):
            figures += ablation_figures(store, result, link)
        elif isinstance(result, DFAJobResult):
            figures += dfa_figures(result, link)
    return figures


def head_rows(store: FeatureStore, layer: int, head: int) -> list[tuple[str, float, float | None]]:
    """A head's page: (node, estimate, exact) of each of its nodes among the stored top nodes."""
    rows = []
    for info in list_results(store):
        result = read_result(store, info.kind)
        if isinstance(result, AttributionJobResult):
            for item in _scored(result):
                if item.node.kind in HEAD_KINDS and (item.node.layer, item.node.index) == (
                    layer,
                    head,
                ):
                    rows.append((item.text, item.estimate, item.exact))
    return rows
