"""The demo's HTML report: the job results of the IOI story, as tables and plots."""

from __future__ import annotations

from pathlib import Path

from circuitscan.schemas.job_results import (
    AblationJobResult,
    AttributionJobResult,
    DFAJobResult,
    JobResult,
    SpliceEvalJobResult,
)
from circuitscan.schemas.jobs import JobSpec
from circuitscan.services.reports import (
    Figure,
    Section,
    Table,
    atp_vs_exact_scatter,
    attribution_bars,
    splice_eval_chart,
    write_report,
)


def attribution_section(result: AttributionJobResult, plots: Path) -> Section:
    labels = [node.node for node in result.top]
    bars = attribution_bars(
        labels,
        [node.mean for node in result.top],
        plots / "attribution_top_nodes.png",
        title=f"{result.method}: top nodes (mean effect on the logit difference)",
        xlabel="estimated effect of patching clean → corrupted (logits)",
    )
    verified = [node for node in result.top if node.verification is not None]
    figures = [Figure(bars, "Top nodes by mean |estimated effect|.")]
    if verified:
        scatter = atp_vs_exact_scatter(
            [node.mean for node in verified],
            [node.verification.exact_mean for node in verified if node.verification],
            plots / "attribution_vs_exact.png",
            labels=[node.node for node in verified],
            title=f"{result.method} estimate vs exact patching",
        )
        figures.append(Figure(scatter, "Verified nodes: estimate (y) against exact Δm (x)."))
    rows: list[list[object]] = []
    for node in result.top:
        check = node.verification
        rows.append(
            [
                node.node,
                node.mean,
                node.mean_abs,
                check.exact_mean if check else None,
                check.status if check else "",
            ]
        )
    return Section(
        title=f"Attribution ({result.method}) over {result.n_prompts} clean/corrupted pairs",
        paragraphs=[
            f"{result.n_nodes} nodes scored; the top {result.n_verified} were patched exactly.",
        ],
        tables=[Table(["node", "mean", "mean |·|", "exact mean", "verification"], rows)],
        figures=figures,
    )


def ablation_section(result: AblationJobResult, plots: Path) -> Section:
    top = result.features[:25]
    bars = attribution_bars(
        [f"{result.site} #{f.feature}" for f in top],
        [f.mean_delta for f in top],
        plots / "ablation_deltas.png",
        title=f"{result.mode}-ablation of each active feature ({result.site})",
        xlabel="mean Δ logit difference",
    )
    rows: list[list[object]] = [
        [f.feature, f.mean_delta, f.mean_abs_delta, f.n_active, f.n_prompts] for f in top
    ]
    return Section(
        title=f"Feature ablation scan ({result.site}, {result.mode})",
        paragraphs=[
            f"{result.n_ablations} exact ablations over {result.n_prompts} prompts; "
            f"clean mean logit difference {result.baseline_mean:.3f}.",
        ],
        tables=[Table(["feature", "mean Δ", "mean |Δ|", "active on", "prompts"], rows)],
        figures=[Figure(bars, "Largest mean |Δ| first.")],
    )


def dfa_section(result: DFAJobResult, plots: Path) -> Section:
    """The most active feature's split by head and by source role, and every feature's summary."""
    figures = []
    if result.features:
        top = result.features[0]
        parts = {f"head {h}": v for h, v in enumerate(top.head_means)}
        parts |= {f"from {role}": v for role, v in top.source_means.items()}
        bars = attribution_bars(
            list(parts),
            list(parts.values()),
            plots / "dfa_top_feature.png",
            title=f"DFA of {result.site} #{top.feature} at {result.position}",
            xlabel="mean contribution to the pre-activation (SAE units)",
        )
        caption = (
            "By head (all sources) and by source role (all heads); each set plus the "
            f"constant {top.bias:.3g} sums to the mean pre-activation."
        )
        figures.append(Figure(bars, caption))
    rows: list[list[object]] = []
    for feature in result.features[:25]:
        head = max(range(len(feature.head_means)), key=lambda h: abs(feature.head_means[h]))
        role = max(feature.source_means, key=lambda r: abs(feature.source_means[r]))
        rows.append(
            [
                feature.feature,
                feature.n_prompts,
                feature.mean_activation,
                feature.mean_pre_activation,
                f"{head} ({feature.head_means[head]:+.3g})",
                f"{role} ({feature.source_means[role]:+.3g})",
            ]
        )
    return Section(
        title=f"Direct feature attribution ({result.site} at {result.position})",
        paragraphs=[
            f"{len(result.features)} features decomposed over {result.n_prompts} prompts, "
            "attention patterns and norm scales frozen (exact).",
        ],
        tables=[
            Table(["feature", "prompts", "activation", "pre-act", "top head", "top source"], rows)
        ],
        figures=figures,
    )


def splice_section(result: SpliceEvalJobResult, plots: Path) -> Section:
    chart = splice_eval_chart(result.rows, plots / "splice_eval.png", title="SAE splice evaluation")
    rows: list[list[object]] = [
        [
            "+".join(r.sites) or "—",
            r.variant,
            r.metric_mean,
            r.kl_metric_pos,
            r.metric_recovered,
        ]
        for r in result.rows
    ]
    return Section(
        title=f"SAE splice evaluation over {result.n_prompts} prompts",
        paragraphs=[
            "spliced: activation replaced by the SAE reconstruction (error term removed); "
            "mean_ablation: replaced by its mean over the reference prompts.",
        ],
        tables=[Table(["sites", "variant", "metric", "KL (nats)", "recovered"], rows)],
        figures=[Figure(chart, "Task metric and KL per variant.")],
    )


def write_demo_report(
    out_dir: Path,
    specs: dict[str, JobSpec],
    attribution: AttributionJobResult,
    ablation: AblationJobResult,
    splice: JobResult,
    dfa: JobResult | None = None,
) -> Path:
    plots = out_dir / "plots"
    sections = [
        Section(
            title="Jobs",
            tables=[
                Table(
                    ["step", "job", "store"],
                    [[step, spec.name, spec.store] for step, spec in specs.items()],
                )
            ],
        ),
        attribution_section(attribution, plots),
        ablation_section(ablation, plots),
    ]
    if isinstance(splice, SpliceEvalJobResult):
        sections.append(splice_section(splice, plots))
    if isinstance(dfa, DFAJobResult):
        sections.append(dfa_section(dfa, plots))
    return write_report(out_dir, sections, title="circuitscan — IOI on the default model")
