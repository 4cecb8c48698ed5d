"""matplotlib (Agg) plots for reports. Each takes plain data or result models and a path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from circuitscan.schemas.analyses import (
    DFAResult,
    PatchPathNode,
    QKPairTable,
    QKVarianceExplained,
    SpliceEvalRow,
)


def _save(fig, path: Path | str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def attribution_bars(
    labels: Sequence[str], values: Sequence[float], path: Path | str, *, title: str = "",
    xlabel: str = "attribution (metric units)", top: int = 25,
) -> Path:  # fmt: skip
    """Horizontal bars of the ``top`` largest |values|, largest at the top."""
    order = np.argsort(-np.abs(np.asarray(values, dtype=float)))[:top][::-1]
    vals = np.asarray(values, dtype=float)[order]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(order) + 1.2))
    ax.barh([labels[i] for i in order], vals, color=np.where(vals >= 0, "#2b8a3e", "#c92a2a"))
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, path)


def atp_vs_exact_scatter(
    estimates: Sequence[float], exact: Sequence[float], path: Path | str, *, title: str = "",
    labels: Sequence[str] | None = None, annotate: int = 5,
) -> Path:  # fmt: skip
    """Estimated (AtP/AtP*) against exact patching effects, with the y = x line."""
    est, ex = np.asarray(estimates, dtype=float), np.asarray(exact, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(ex, est, s=12, alpha=0.7)
    lim = [min(est.min(initial=0), ex.min(initial=0)), max(est.max(initial=0), ex.max(initial=0))]
    ax.plot(lim, lim, "k--", lw=0.7)
    if labels is not None:
        for i in np.argsort(-np.abs(ex))[:annotate]:
            ax.annotate(labels[i], (ex[i], est[i]), fontsize=7)
    corr = float(np.corrcoef(est, ex)[0, 1]) if len(est) > 1 and ex.std() > 0 else float("nan")
    ax.set_xlabel("exact patching Δmetric")
    ax.set_ylabel("estimate")
    ax.set_title(f"{title} (r = {corr:.3f})" if title else f"r = {corr:.3f}")
    return _save(fig, path)


def splice_eval_chart(rows: Sequence[SpliceEvalRow], path: Path | str, *, title: str = "") -> Path:
    """Per site set: metric and KL at the metric position for each variant, clean as a line."""
    clean = next((r for r in rows if r.variant == "clean"), None)
    groups = list(dict.fromkeys("+".join(r.sites) for r in rows if r.sites))
    variants = list(dict.fromkeys(r.variant for r in rows if r.sites))
    lookup = {("+".join(r.sites), r.variant): r for r in rows}
    fig, (ax_m, ax_kl) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(groups) + 4), 4))
    width = 0.8 / max(1, len(variants))
    x = np.arange(len(groups))
    for i, variant in enumerate(variants):
        metric = [lookup[(g, variant)].metric_mean if (g, variant) in lookup else np.nan
                  for g in groups]  # fmt: skip
        kl = [lookup[(g, variant)].kl_metric_pos if (g, variant) in lookup else np.nan
              for g in groups]  # fmt: skip
        ax_m.bar(x + i * width, metric, width, label=variant)
        ax_kl.bar(x + i * width, kl, width, label=variant)
    if clean is not None:
        ax_m.axhline(clean.metric_mean, color="k", ls="--", lw=0.8, label="clean")
    for ax, ylabel in ((ax_m, "mean metric"), (ax_kl, "KL(orig ‖ variant), nats")):
        ax.set_xticks(x + width * (len(variants) - 1) / 2, groups, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
    ax_kl.set_yscale("symlog", linthresh=1e-3)
    ax_m.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def dfa_heatmap(result: DFAResult, path: Path | str, *, title: str = "") -> Path:
    """Head × source-position contributions to a feature's pre-activation."""
    data = np.asarray(result.contributions, dtype=float)[:, : result.dest_pos + 1]
    vmax = float(np.abs(data).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * data.shape[1] + 2), 0.3 * data.shape[0] + 2))
    im = ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_ylabel("head")
    ax.set_yticks(range(data.shape[0]))
    if result.tokens:
        ticks = [f"{t}:{tok!r}" for t, tok in enumerate(result.tokens[: data.shape[1]])]
        ax.set_xticks(range(data.shape[1]), ticks, rotation=70, fontsize=7)
    ax.set_xlabel("source position")
    fig.colorbar(im, ax=ax, label="contribution (pre-activation units)")
    ax.set_title(title or f"DFA {result.site}#{result.feature} @ {result.dest_pos} "
                 f"(pre {result.pre_activation:.2f}, bias {result.bias:.2f})")  # fmt: skip
    return _save(fig, path)


def qk_pair_heatmap(
    table: QKPairTable, path: Path | str, *, top: int = 12, title: str = ""
) -> Path:
    """The ``top`` query and key components by total |contribution|, as a heatmap."""
    data = np.asarray(table.table, dtype=float)
    rows = np.argsort(-np.abs(data).sum(1))[:top]
    cols = np.argsort(-np.abs(data).sum(0))[:top]
    sub = data[np.ix_(rows, cols)]
    vmax = float(np.abs(sub).max()) or 1.0
    fig, ax = plt.subplots(figsize=(0.45 * len(cols) + 3, 0.35 * len(rows) + 2))
    im = ax.imshow(sub, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_yticks(range(len(rows)), [table.query_labels[i] for i in rows], fontsize=8)
    ax.set_xticks(range(len(cols)), [table.key_labels[i] for i in cols], rotation=60, fontsize=8)
    ax.set_ylabel("query-side component")
    ax.set_xlabel("key-side component")
    fig.colorbar(im, ax=ax, label="score contribution")
    ax.set_title(title or f"L{table.layer}H{table.head} {table.dest_pos}→{table.src_pos} "
                 f"score {table.score:.2f}")  # fmt: skip
    return _save(fig, path)


def variance_explained_curve(
    result: QKVarianceExplained, path: Path | str, *, title: str = ""
) -> Path:
    """Fraction of the score variance explained by the top-n pairs, against n."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    n = np.arange(1, len(result.fraction_explained) + 1)
    ax.plot(n, result.fraction_explained, marker="o")
    ax.set_xlabel("top-n (query, key) pairs")
    ax.set_ylabel("fraction of score variance explained")
    ax.set_title(title or f"L{result.layer}H{result.head} over {result.n_prompts} prompts")
    ax.axhline(1.0, color="k", lw=0.5, ls=":")
    return _save(fig, path)


def patch_path_curves(entry: PatchPathNode, fractions: Sequence[float], path: Path | str) -> Path:
    """Δm/f against f per prompt: AtP's estimate at f = 0, the exact Δm at f = 1."""
    steps = list(fractions)
    partial = [list(step) for step in entry.partial]
    if steps[-1] < 1.0:
        steps.append(1.0)
        partial.append(list(entry.exact))
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.get_cmap("tab10")
    atp = entry.estimates.get("atp")
    for prompt in range(len(entry.exact)):
        color = colors(prompt % 10)
        ax.plot(steps, [step[prompt] for step in partial], marker="o", ms=3, lw=1, color=color)
        if atp is not None:
            ax.plot([0.0], [atp[prompt]], marker="x", ms=7, color=color)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("fraction f of the patch")
    ax.set_ylabel("Δmetric / f")
    ax.set_title(f"{entry.node}: × AtP at f = 0, exact Δm at f = 1")
    return _save(fig, path)
