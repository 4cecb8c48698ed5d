"""Circuit-analysis outputs as terminal text: the tables ``circuitscan analyze`` prints."""

from __future__ import annotations

import json
from typing import Any

from circuitscan.schemas.analyses import (
    DFAOutput,
    HeadFeatureLogitOutput,
    PatchPathOutput,
    QKPairsOutput,
    SpliceEvalOutput,
)
from circuitscan.services.reports.analysis_sections import patch_path_table


def splice_table(output: SpliceEvalOutput) -> tuple[list[str], list[list[Any]]]:
    """Per site set: clean, spliced, KL, mean-ablation and error-only-ablation metrics."""
    clean = next(r for r in output.rows if r.variant == "clean")
    by = {("+".join(r.sites), r.variant): r for r in output.rows if r.sites}
    columns = [
        "SAE site(s)", "clean metric", "spliced metric", "spliced KL (END)", "spliced KL (all)",
        "recovered", "mean-ablation metric", "mean-ablation KL (END)",
        "error-only ablation metric", "error-only ablation KL (END)",
    ]  # fmt: skip
    rows = []
    for group in dict.fromkeys(g for g, _ in by):
        sp, ma, em = by[(group, "spliced")], by[(group, "mean_ablation")], by[(group, "error_mean")]
        rows.append([
            group, clean.metric_mean, sp.metric_mean, sp.kl_metric_pos, sp.kl_all_pos,
            sp.metric_recovered, ma.metric_mean, ma.kl_metric_pos, em.metric_mean,
            em.kl_metric_pos,
        ])  # fmt: skip
    return columns, rows


def format_table(columns: list[str], rows: list[list[Any]], markdown: bool = False) -> str:
    """A plain-text (or markdown) table; floats with 3 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))

    text = [[cell(v) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in text])
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), *(fmt.format(*r) for r in text)])


def head_feature_logit_tables(
    output: HeadFeatureLogitOutput, n: int = 10
) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, columns, rows) of the per-unit ranking and of the prompt's own ranking."""
    r = output.result

    def tokens(h: Any) -> str:
        return " ".join(
            repr(t.token if t.token is not None else t.token_id) for t in h.top_tokens[:4]
        )

    per_unit = (
        "heads by |logit diff per unit| (weights only: per unit of the feature, full attention)",
        ["head", "logit diff / unit", "attention", "contribution", "top tokens"],
        [[f"L{h.layer}H{h.head}", h.logit_diff, h.attention, h.contribution, tokens(h)]
         for h in r.heads[:n]],
    )  # fmt: skip
    ranked = r.by_contribution()
    if not ranked:
        return [per_unit]
    own = (
        f"heads by |contribution| on prompt {output.prompt_index} (activation "
        f"{output.feature_activation:.3f} × attention {output.dest_pos}→{output.src_pos} × "
        "per unit: the prompt's own ranking)",
        ["head", "contribution", "attention", "logit diff / unit", "top tokens"],
        [[f"L{h.layer}H{h.head}", h.contribution, h.attention, h.logit_diff, tokens(h)]
         for h in ranked[:n]],
    )  # fmt: skip
    return [per_unit, own]


def head_feature_logit_text(output: HeadFeatureLogitOutput) -> str:
    """The feature's line, then both rankings (per unit, and this prompt's contributions)."""
    r = output.result
    lines = [
        f"{r.sae_site}#{r.feature} (activation {output.feature_activation:.3f}, "
        f"attribution {output.feature_attribution:+.3f}) at pos {output.src_pos} → "
        f"pos {output.dest_pos}, logit({output.answer!r}) − logit({output.wrong!r})"
    ]
    for title, columns, rows in head_feature_logit_tables(output):
        lines += ["", title, format_table(columns, rows)]
    return "\n".join(lines)


def summary_lines(output: Any) -> str:
    """A short plain-text summary of one output for the terminal."""
    if isinstance(output, SpliceEvalOutput):
        return format_table(*splice_table(output))
    if isinstance(output, HeadFeatureLogitOutput):
        return head_feature_logit_text(output)
    if isinstance(output, DFAOutput):
        from circuitscan.services.reports import render_dfa_text

        r = output.result
        return (
            f"{r.site}#{r.feature} at pos {r.dest_pos}: pre-activation {r.pre_activation:.4f}, "
            f"tree sum error {output.max_sum_error:.2e}\n" + render_dfa_text(output.tree, 2)
        )
    if isinstance(output, PatchPathOutput):
        return format_table(*patch_path_table(output))
    if isinstance(output, QKPairsOutput):
        v = output.variance
        cols = ["query", "key", "mean contribution", "variance share", "cum. explained"]
        rows = [
            [q, k, m, share, f]
            for (q, k, m), share, f in zip(
                v.top_pairs, v.variance_share, v.fraction_explained, strict=True
            )
        ][:12]
        head = (
            f"L{v.layer}H{v.head} {output.dest}→{output.src} (mean attention "
            f"{output.mean_attention:.3f}) over {v.n_prompts} prompts"
        )
        return head + "\n" + format_table(cols, rows)
    return json.dumps(output.model_dump(), indent=1)[:2000]
