"""How a targeted ablation scan reads in the CLI and the report: its stop, and which values
are exact (every one at feature level; at pair level a feature's n_exact of its pairs)."""

from __future__ import annotations

from circuitscan.schemas.job_results import AblationJobResult, FeatureDelta
from circuitscan.schemas.targeted_scan import TargetedScan
from circuitscan.services.jobs.job_kind import CliView


def targeted_line(info: TargetedScan) -> str:
    """How a targeted scan went, in one sentence (two at pair level)."""
    unit = "pairs" if info.granularity == "pair" else "candidates"
    if info.granularity == "pair":
        gap = (
            f"the top {info.top_k} held for {info.patience} further pairs and no estimated "
            f"pair left can reorder it (an estimated pair's |Δ| taken within "
            f"[{info.gap_ratio_low or 0:.3g}, {info.gap_ratio or 0:.3g}] × its estimate, "
            f"gap: {info.gap})"
        )
    else:
        gap = (
            f"the exact top {info.top_k}'s smallest mean |Δ| reached {info.gap_ratio or 0:.3g} "
            f"× the next candidate's estimate (gap: {info.gap})"
        )
    why = {
        "patience": f"the top {info.top_k} held for {info.patience} further candidates",
        "gap": gap,
        "budget": f"its budget of {info.budget} {unit} was spent",
        "exhausted": f"every {unit[:-1]} was ablated",
    }[info.stop_rule]
    line = (
        f"targeted by {info.store}: {info.n_ablated} of {info.n_candidates} {unit} "
        f"ablated ({info.ablation_fraction:.1%} of the full scan's {info.full_scan_ablations} "
        f"ablations); stopped after {info.stopped_after} because {why}"
    )
    if info.granularity == "pair":
        line += (
            ". Pair level: a feature's mean Δ is its ablated pairs' exact Δ plus its other "
            "pairs' estimates; 'exact' counts its ablated pairs, its largest-|estimate| "
            "prompts (ties by prompt)"
        )
    return line


def exact_cell(f: FeatureDelta) -> str:
    """'n_exact/n_active' at pair level; 'all' where every value is exact."""
    return "all" if f.n_exact is None else f"{f.n_exact}/{f.n_active}"


def targeted_cli_view(result: AblationJobResult, top: int) -> CliView:
    assert result.targeted is not None
    return CliView(
        header=f"ablation_scan ({result.mode}, targeted) at {result.site}: {result.n_prompts} "
        f"prompts, {result.n_ablations} ablations, baseline metric {result.baseline_mean:.4g}\n"
        + targeted_line(result.targeted),
        columns=["feature", "mean_delta", "mean_abs", "estimate", "estimate_abs", "active",
                 "exact"],
        rows=[
            (f.feature, f.mean_delta, f.mean_abs_delta, f.estimate_mean, f.estimate_mean_abs,
             f.n_active, exact_cell(f))
            for f in result.features[:top]
        ],
    )  # fmt: skip
