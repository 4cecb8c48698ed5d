"""Report sections (text, tables, plots) for the outputs of the circuit analyses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from circuitscan.schemas.analyses import (
    DFAOutput,
    HeadFeatureLogitOutput,
    HeadLogitEffect,
    PatchPathOutput,
    QKPairsOutput,
    SpliceEvalOutput,
)
from circuitscan.services.reports.dfa_render import render_dfa_html
from circuitscan.services.reports.html_report import Figure, Section, Table
from circuitscan.services.reports.plots import (
    attribution_bars,
    dfa_heatmap,
    patch_path_curves,
    qk_pair_heatmap,
    splice_eval_chart,
    variance_explained_curve,
)

_VARIANT_NAMES = {
    "clean": "clean model",
    "spliced": "SAE spliced (error term zeroed)",
    "error_mean": "error-only ablation (error term → its reference mean)",
    "mean_ablation": "mean ablation of the activation (reference mean)",
}


def splice_section(out: SpliceEvalOutput, out_dir: Path) -> Section:
    """Metric and KL per site set and variant, as a table and a bar chart."""
    chart = splice_eval_chart(out.rows, out_dir / "splice_eval.png",
                              title="SAE splice evaluation")  # fmt: skip
    rows = [
        ["+".join(r.sites) or "–", _VARIANT_NAMES[r.variant], r.metric_mean, r.metric_std,
         r.kl_metric_pos, r.kl_all_pos, r.metric_recovered]
        for r in out.rows
    ]  # fmt: skip
    return Section(
        title="SAE splice evaluation",
        paragraphs=[
            f"{out.context.n_prompts} {out.context.task.upper()} prompts (seed "
            f"{out.context.seed}); metric: {_metric_text(out.context)}. "
            f"Means for mean ablation and the error term over {out.reference_prompts} "
            f"{out.reference}. KL(original ‖ variant) in nats at the answer position and "
            "averaged over all real tokens. 'recovered' = (metric − mean-ablation metric) / "
            "(clean − mean-ablation metric). Sites in one set are intervened on together in "
            "one forward pass, so a later SAE encodes what the earlier replacements produced.",
        ],
        tables=[
            Table(
                columns=[
                    "sites",
                    "variant",
                    "metric",
                    "std",
                    "KL (answer pos)",
                    "KL (all)",
                    "recovered",
                ],
                rows=rows,
            )
        ],
        figures=[Figure(chart, "Mean metric and KL per site set and variant.")],
    )


def _metric_text(context: Any) -> str:
    metric = context.metric
    if metric is None or metric.kind == "logit_diff":
        where = (
            "the last token"
            if metric is None or metric.position == "last"
            else (f"position {metric.position}")
        )
        return f"logit difference answer − wrong at {where}"
    return f"{metric.kind} at {metric.position}"


def head_feature_logit_section(out: HeadFeatureLogitOutput, out_dir: Path) -> Section:
    """Heads ranked by their direct logit-difference effect through one feature."""
    r = out.result
    heads = r.heads[:25]
    bars = attribution_bars(
        [f"L{h.layer}H{h.head}" for h in heads], [h.logit_diff for h in heads],
        out_dir / "head_feature_logit.png", xlabel="logit(answer) − logit(wrong) per unit feature",
        title=f"{r.sae_site}#{r.feature} → head → logits",
    )  # fmt: skip

    def tokens(h: HeadLogitEffect, n: int) -> str:
        return " ".join(
            repr(t.token if t.token is not None else t.token_id) for t in h.top_tokens[:n]
        )

    def bottom(h: HeadLogitEffect) -> str:
        return " ".join(
            repr(t.token if t.token is not None else t.token_id) for t in h.bottom_tokens[:4]
        )

    rows = [
        [f"L{h.layer}H{h.head}", h.logit_diff, h.attention, h.contribution, tokens(h, 6),
         bottom(h)]
        for h in r.heads[:12]
    ]  # fmt: skip
    tables = [
        Table(
            columns=[
                "head",
                "logit diff / unit",
                "attention",
                "contribution",
                "top tokens pushed up",
                "pushed down",
            ],
            rows=rows,
        )
    ]
    ranked = r.by_contribution()
    paragraphs = [
        f"Feature {r.sae_site}#{r.feature}: activation {out.feature_activation:.3f} at "
        f"position {out.src_pos} of prompt {out.prompt_index}, attribution "
        f"{out.feature_attribution:+.3f} (metric units). "
        f"First table, ranked by the weights alone: for every later head, the logit difference "
        f"({out.answer or r.answer_id!r} − {out.wrong or r.wrong_id!r}) it writes per unit of "
        "the feature at a source it attends to fully, "
        f"through W_V·W_O and the unembedding, norm scales frozen at source "
        f"{out.src_pos} / destination {out.dest_pos}.",
    ]
    if ranked:
        paragraphs.append(
            "Second table, ranked by this prompt's own contributions: contribution = activation "
            f"× the head's attention from position {out.dest_pos} to {out.src_pos} × the "
            "per-unit value, the change in the logit difference when the feature is removed "
            "from what that head reads (patterns and norm scales frozen); the two rankings can "
            "differ, since a head with a large per-unit effect may hardly attend to the source."
        )
        tables.append(
            Table(
                columns=[
                    "head",
                    "contribution",
                    "attention",
                    "logit diff / unit",
                    "top tokens pushed up",
                ],
                rows=[
                    [
                        f"L{h.layer}H{h.head}",
                        h.contribution,
                        h.attention,
                        h.logit_diff,
                        tokens(h, 6),
                    ]
                    for h in ranked[:12]
                ],
            )
        )
    return Section(
        title="Head → feature → logit",
        paragraphs=paragraphs,
        tables=tables,
        figures=[Figure(bars, "Heads with the largest |direct effect| per unit of the feature.")],
    )


def dfa_section(out: DFAOutput, out_dir: Path) -> Section:
    """Head × source heatmap and the recursive tree."""
    r = out.result
    heat = dfa_heatmap(r, out_dir / "dfa_heatmap.png")
    return Section(
        title="Direct feature attribution",
        paragraphs=[
            f"Prompt {out.prompt_index}: {out.text!r}. Feature {r.site}#{r.feature} at position "
            f"{r.dest_pos}: pre-activation {r.pre_activation:.4f} = Σ head×source "
            f"contributions + encoder bias {r.bias:.4f} (patterns and norm scales frozen); "
            f"its attribution to the logit difference is {out.feature_attribution:+.3f}.",
            f"Recursive DFA (depth {int(out.pruning['max_depth'])}, top "
            f"{int(out.pruning['top_k'])} children per node, expanding children ≥ "
            f"{out.pruning['min_frac']:.0%} of their parent): every node's children sum to it; "
            f"largest deviation {out.max_sum_error:.2e}.",
        ],
        figures=[Figure(heat, "Contribution of each head and source position.")],
        raw_html=[render_dfa_html(out.tree)],
    )


def qk_section(out: QKPairsOutput, out_dir: Path) -> Section:
    """One prompt's pair heatmap and the variance explained over prompts."""
    v = out.variance
    heat = qk_pair_heatmap(out.tables[0], out_dir / "qk_pairs.png")
    curve = variance_explained_curve(v, out_dir / "qk_variance.png")
    rows = [
        [q, k, m, share, f]
        for (q, k, m), share, f in zip(
            v.top_pairs, v.variance_share, v.fraction_explained, strict=True
        )
    ]
    return Section(
        title="QK feature pairs",
        paragraphs=[
            f"Head L{v.layer}H{v.head} (mean attention {out.dest}→{out.src} "
            f"{out.mean_attention:.3f}, the largest in its layer). Its attention score from "
            f"{out.dest} to {out.src} split into (query component, key component) pairs: "
            "active SAE features, the SAE error, b_dec and the projection bias on each side; "
            "each table sums to the score. Over "
            f"{v.n_prompts} prompts, a pair's variance share is Cov(pair, score)/Var(score) "
            "(all shares sum to 1); pairs are ranked by it, and the last column is "
            "1 − Var(score − top-n pairs)/Var(score). Features are keyed by index, so a "
            "feature specific to one name counts only on prompts with that name.",
        ],
        tables=[
            Table(
                columns=[
                    "query",
                    "key",
                    "mean contribution",
                    "variance share",
                    "cum. fraction explained",
                ],
                rows=rows[:15],
            )
        ],
        figures=[
            Figure(heat, "Prompt 0: the largest query × key components."),
            Figure(curve, "Fraction of score variance explained by the top-n pairs."),
        ],
    )


def patch_path_table(out: PatchPathOutput) -> tuple[list[str], list[list[Any]]]:
    """Per node: mean |Δm| exact and frozen, mean ranking score per method, sign changes."""
    methods = list(out.nodes[0].ranking_scores) if out.nodes else []

    def mean_abs(values: list[float]) -> float:
        return sum(abs(v) for v in values) / max(len(values), 1)

    columns = ["node", "mean |Δm|", "later patterns frozen",
               *(f"{m} mean |score|" for m in methods), "sign changes"]  # fmt: skip
    rows = [
        [e.node, e.mean_abs_exact, e.mean_abs_frozen,
         *(mean_abs(e.ranking_scores[m]) for m in methods), f"{e.sign_changes} of {len(e.exact)}"]
        for e in out.nodes
    ]  # fmt: skip
    return columns, rows


def patch_path_section(out: PatchPathOutput, out_dir: Path) -> Section:
    """Per node: the exact, frozen-pattern and estimated effects, and Δm/f along the patch."""
    columns, rows = patch_path_table(out)
    figures = [
        Figure(
            patch_path_curves(e, out.fractions, out_dir / f"patch_path_{i}.png"),
            f"{e.node}: one line per prompt.",
        )
        for i, e in enumerate(out.nodes)
    ]
    return Section(
        title="Patch path",
        paragraphs=[
            f"{out.context.n_prompts} {out.context.task.upper()} prompt pairs (seed "
            f"{out.context.seed}), corrupted: {out.corruption}. For each node: the exact "
            "effect of patching its corrupted value in; the same with every later block's "
            "attention pattern frozen at its clean value (what the node does without later "
            "heads attending differently); each method's ranking score; and Δm/f for the "
            f"patch taken a fraction f ∈ {out.fractions} of the way, which tends to AtP's "
            "estimate as f → 0. A prompt whose Δm/f at the smallest f and full Δm differ in "
            "sign is one no first-order estimate at the clean point gets right.",
        ],
        tables=[Table(columns=columns, rows=rows)],
        figures=figures,
    )


def report_sections(
    out_dir: Path | str,
    *,
    splice: SpliceEvalOutput | None = None,
    hfl: HeadFeatureLogitOutput | None = None,
    dfa: DFAOutput | None = None,
    qk: QKPairsOutput | None = None,
    path: PatchPathOutput | None = None,
) -> list[Section]:
    """Sections for whichever outputs are given; plots are written into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    if splice is not None:
        sections.append(splice_section(splice, out))
    if hfl is not None:
        sections.append(head_feature_logit_section(hfl, out))
    if dfa is not None:
        sections.append(dfa_section(dfa, out))
    if qk is not None:
        sections.append(qk_section(qk, out))
    if path is not None:
        sections.append(patch_path_section(path, out))
    return sections
