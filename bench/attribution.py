"""Attribution benchmark: AtP/AtP* cost in forward passes, scan efficiency, IOI recall.

    .venv/bin/python bench/attribution.py [--rounds 2] [--recall-prompts 8]
                                          [--scan-prompts 4] [--naive-sample 8] [--threads 1]
                                          [--certify-samples 800] [--certify-p 0.1]
                                          [--tables PREFIX] [--skip-timing]

On the default model (SmolLM2-135M-Instruct, 30 layers) with its default SAEs
(L15.resid_post, L15.z; top-k 32 of 2304) over IOI prompts (ABC-corrupted):

- atp_forward_equivalents / atpstar_forward_equivalents: wall time of
  run_atp for every node of one prompt pair (z/q/k/v heads, MLP neurons and
  whole MLPs, SAE features and errors, at every position) over the wall time
  of one plain forward pass of the clean prompt, timed side by side in
  interleaved rounds (median of per-round ratios). Targets: AtP ≤ 3.5,
  AtP* (QK fix + GradDrop) ≤ 3 + n_layers.
- scan_vs_ideal_ratio: throughput (ablations per second) of ablation_scan
  (zero ablation of every active L15.resid_post feature at the S2 and END
  positions) over the ideal: the same suffix forward passes alone, inputs
  prepared beforehand. Target ≥ 0.9. Also prints the speed-up over a naive
  loop of one full forward pass per ablation (timed on a sample).
- atp2_forward_equivalents / atpstar2_forward_equivalents: the same for the
  second-order estimators (one extra backward pass through the first one's
  graph). Target ≤ 5 for atp2.
- verified_recall_cost_at_20_*: nodes patched exactly, in estimated order,
  until all of the true top-20 are found (the AtP* paper's cost of verified
  recall; 20 at best); ``_best`` is the cheapest of atp, atpstar, atp2,
  atpstar2 (target ≤ 30).
- missed_effect_bound_heads: after verifying AtP*'s top-20 head nodes,
  pipelines.attribution.certify patches --certify-samples random subsets
  (inclusion probability --certify-p) of the other head nodes and bounds the
  largest mean |Δm| any of them can have at 95 %; true_max_unverified_heads
  is that largest mean |Δm| from the exhaustive patching (targets: bound ≥
  true, bound ≤ 2 × true); certify_forward_passes the subsets patched. The
  same draw is bounded with AtP*'s per-prompt scores as a control variate
  (missed_effect_bound_heads) and without (missed_effect_bound_heads_plain).
  The exhaustive tables are computed once and serve every estimator's
  recall, cost and the true largest unverified effect; --tables keeps them
  on disk so a rerun (another --certify-p, say) skips the exhaustive patching.
- recall_at_20_{heads,features}_{atp,atpstar}: recall@20 of AtP and AtP*
  (and atp2, atpstar2) rankings against exhaustive exact patching on IOI (heads: z/q at END,
  k/v at IO and S1; features: every feature of both L15 SAEs at IO, S1, S2,
  END), nodes ranked by mean |effect| over 8 prompt pairs (mixed templates),
  with recall@10 and the cost of verified recall printed alongside, and the
  true top-20 nodes each method missed with their estimated rank and their
  exact effect with every later attention pattern frozen (how much of it
  later heads carry by attending differently, which no first-order estimate
  at the clean point sees once those softmaxes saturate).

Ends with one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from circuitscan.pipelines.attribution import ablation_scan, run_atp
from circuitscan.pipelines.attribution.ablation_scan import (
    _ablation_values,
    ablation_inputs,
    prepare_scan,
)
from circuitscan.pipelines.attribution.certify import subset_patch
from circuitscan.pipelines.attribution.subset_stats import (
    certification_result,
    certification_sums,
    draw_subsets,
)
from circuitscan.pipelines.attribution.suffix import suffix_metric
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.sae_splice import sae_decode, sae_encode
from circuitscan.schemas.attribution import AttributionMethod, NodeSelection
from circuitscan.schemas.certification import CertificationResult
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing.evaluation import (
    RankingComparison,
    compare_rankings,
    ioi_feature_selections,
    ioi_head_selections,
    ioi_pairs,
    patch_pairs,
)

METRIC = MetricSpec()
METHODS = {name: AttributionMethod.parse(name) for name in ("atp", "atpstar", "atp2", "atpstar2")}
ALL_NODES = NodeSelection(
    kinds=["z", "q", "k", "v", "neuron", "mlp", "feature", "sae_error"], positions="all"
)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_equivalents(model, saes, rounds: int) -> dict[str, float]:
    """Median over rounds of (run_atp wall time) / (one forward pass), per method."""
    pairs = ioi_pairs(model, 1)

    def forward() -> None:
        with torch.no_grad():
            model(pairs.clean, return_type="logits")

    def attribute(name: str) -> Callable[[], object]:
        return lambda: run_atp(
            model, saes, pairs.clean, pairs.corrupt, pairs.lengths, METRIC,
            pairs.answer, pairs.wrong, ALL_NODES, method=METHODS[name],
        )  # fmt: skip

    forward()
    attribute("atp")()  # warm-up: first calls pay for allocations
    ratios: dict[str, list[float]] = {name: [] for name in METHODS}
    n_nodes = 0
    for round_ in range(rounds):
        for name in METHODS:
            before = _timed(forward)
            seconds = _timed(attribute(name))
            after = _timed(forward)
            ratios[name].append(seconds / ((before + after) / 2))
            print(
                f"  round {round_}: {name} {seconds:.2f}s, forward {before:.3f}s/{after:.3f}s "
                f"-> {ratios[name][-1]:.2f} forward equivalents"
            )
    result = run_atp(
        model, saes, pairs.clean, pairs.corrupt, pairs.lengths, METRIC,
        pairs.answer, pairs.wrong, ALL_NODES,
    )  # fmt: skip
    n_nodes = sum(group.size for group in result.groups)
    print(f"  nodes per prompt pair: {n_nodes} ({int(pairs.lengths[0])} tokens)")
    return {name: statistics.median(values) for name, values in ratios.items()}


def scan_efficiency(
    model, sae, site: HookSite, n_prompts: int, naive_sample: int, rounds: int
) -> float:
    """Scan throughput over ideal suffix-only throughput; prints the naive-loop speed-up.

    Scan and ideal are timed alternately, ``rounds`` times each, and the
    median of the per-round ratios is reported, so that load changes on a
    shared machine hit both sides alike.
    """
    pairs = ioi_pairs(model, n_prompts)
    tokens, lengths, answer, wrong = pairs.clean, pairs.lengths, pairs.answer, pairs.wrong
    positions = ["S2", "END"]
    batch_size = 64
    kwargs = {"positions": positions, "named_positions": pairs.named_positions}

    def run_scan():
        return ablation_scan(
            model, sae, site, tokens, lengths, METRIC, answer, wrong, batch_size=batch_size,
            **kwargs,
        )  # fmt: skip

    # Ideal: the same suffix passes with their inputs built beforehand.
    prepared = prepare_scan(
        model, sae, site, tokens, lengths, METRIC, answer, wrong, positions,
        pairs.named_positions,
    )  # fmt: skip
    active = ((prepared.acts > 0) & prepared.chosen[..., None]).any(1)
    pairs_ = torch.nonzero(active)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for begin in range(0, pairs_.shape[0], batch_size):
        prompt, feature = pairs_[begin : begin + batch_size].T
        values = _ablation_values(prepared, "zero", prompt, feature, generator)
        resid, hooks = ablation_inputs(sae, site, prepared, prompt, feature, values)
        batches.append((prompt, resid, hooks))

    def run_ideal() -> None:
        for prompt, resid, hooks in batches:
            suffix_metric(
                model, resid, prepared.start_layer, METRIC, lengths=lengths[prompt],
                tokens=tokens[prompt], answer=answer[prompt], wrong=wrong[prompt], hooks=hooks,
            )  # fmt: skip

    run_ideal()  # warm-up
    scan = run_scan()
    ratios, scan_times, ideal_times = [], [], []
    for _ in range(rounds):
        scan_times.append(_timed(run_scan))
        ideal_times.append(_timed(run_ideal))
        ratios.append(ideal_times[-1] / scan_times[-1])
    scan_seconds = statistics.median(scan_times)

    # Naive: one full forward pass (batch of one) per ablation, on a sample.
    sample = pairs_[torch.randperm(pairs_.shape[0], generator=generator)[:naive_sample]]
    start = time.perf_counter()
    for prompt, feature in sample.tolist():
        chosen = prepared.chosen[prompt]

        def hook(x, hook=None, feature=feature, chosen=chosen):
            acts = sae_encode(sae, x)
            edited = acts.clone()
            edited[0, chosen, feature] = 0.0
            return x + (sae_decode(sae, edited, x) - sae_decode(sae, acts, x))

        with torch.no_grad():
            logits = model.run_with_hooks(
                tokens[prompt : prompt + 1], fwd_hooks=[(site.hook_name, hook)]
            )
        metric_per_prompt(
            logits, METRIC, lengths=lengths[prompt : prompt + 1],
            answer=answer[prompt : prompt + 1], wrong=wrong[prompt : prompt + 1],
        )  # fmt: skip
    naive_per = (time.perf_counter() - start) / max(len(sample), 1)

    n = scan.n_ablations
    ratio = statistics.median(ratios)
    print(f"  {n} ablations over {n_prompts} prompts at {positions} of {site.label}")
    for scan_s, ideal_s in zip(scan_times, ideal_times, strict=True):
        print(f"  scan {scan_s:.2f}s ({n / scan_s:.1f}/s), ideal suffix-only {ideal_s:.2f}s "
              f"({n / ideal_s:.1f}/s): ratio {ideal_s / scan_s:.3f}")  # fmt: skip
    print(f"  median ratio {ratio:.3f} (target >= 0.9)")
    print(f"  naive full forward per ablation: {naive_per * 1000:.0f} ms (sample of "
          f"{len(sample)}); scan speed-up over naive {naive_per * n / scan_seconds:.1f}x")  # fmt: skip
    return ratio


def _stamp(start: float, what: str) -> None:
    print(f"  [{time.perf_counter() - start:.0f}s] {what} done", flush=True)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def report(
    label: str,
    comparison: RankingComparison,
    frozen: dict[int, float],
    subsets: int = 1,
) -> None:
    n_true = int((comparison.truth > 0).sum())
    print(f"  {label}: {len(comparison.nodes)} nodes ({n_true} with nonzero exact effect)")
    for name in comparison.estimates:
        costs = {k: comparison.cost(name, k) for k in (10, 20)}
        print(
            f"    {name:8s} recall@10 {comparison.recall(name, 10):.2f}  "
            f"recall@20 {comparison.recall(name, 20):.2f}  cost of verified recall "
            f"K=10: {costs[10]}  K=20: {costs[20]}  ({comparison.seconds[name]:.1f}s)"
        )
    print(f"    exact patching of every node: {comparison.seconds['patching']:.1f}s")
    top = comparison.truth.argsort(descending=True)[:10].tolist()
    print("    true top-10: " + ", ".join(
        f"{comparison.nodes[i]} {float(comparison.truth[i]):.2f}" for i in top))  # fmt: skip
    truth_order = comparison.truth.argsort(descending=True)
    print(f"    true #20 {float(comparison.truth[truth_order[19]]):.3f}, "
          f"#21 {float(comparison.truth[truth_order[20]]):.3f}")  # fmt: skip
    for name, estimate in comparison.estimates.items():
        rank = torch.empty_like(truth_order)
        rank[estimate.argsort(descending=True)] = torch.arange(len(rank))
        missed = [
            f"{comparison.nodes[i]} (true {float(comparison.truth[i]):.3f}, "
            f"later patterns frozen {float(frozen[i]):.3f}, "
            f"estimate {float(estimate[i]):.3f}, ranked {int(rank[i]) + 1})"
            for i in comparison.misses(name, 20)
        ]
        print(f"    {name} misses of the true top-20: {', '.join(missed) or 'none'}")
    if subsets > 1:
        assert comparison.truth_per_prompt is not None
        size = comparison.truth_per_prompt.shape[0] // subsets
        for name in comparison.estimates:
            recalls = comparison.subset_recalls(name, 20, subsets)
            print(f"    {name} recall@20 on {subsets} disjoint subsets of {size} prompts: "
                  + ", ".join(f"{r:.2f}" for r in recalls)
                  + f" (mean {statistics.mean(recalls):.3f})")  # fmt: skip


def explain_misses(model, saes, pairs, comparison: RankingComparison) -> dict[int, float]:
    """Mean |Δm| with later attention patterns frozen, for every node some method missed."""
    missed = sorted({i for name in comparison.estimates for i in comparison.misses(name, 20)})
    if not missed:
        return {}
    nodes = [comparison.nodes[i] for i in missed]
    frozen = patch_pairs(model, saes, pairs, nodes, freeze_later_patterns=True)
    return dict(zip(missed, frozen.abs().nanmean(0).tolist(), strict=True))


def pattern_mediated(
    comparison: RankingComparison, frozen: dict[int, float], method: str
) -> tuple[int, int]:
    """(misses of the true top-20, those whose mean |Δm| moves by more than half when later
    attention patterns are frozen): how many misses later heads' attention explains."""
    missed = comparison.misses(method, 20)
    moved = [
        i
        for i in missed
        if abs(frozen[i] - float(comparison.truth[i])) > 0.5 * float(comparison.truth[i])
    ]
    return len(missed), len(moved)


def missed_effect_bound(
    model, saes, pairs, comparison: RankingComparison, *, k: int, samples: int, p: float
) -> dict[str, CertificationResult | float | int | str]:
    """Certify the head nodes outside AtP*'s top-k after verifying those exactly.

    One draw of ``samples`` subsets is patched once; its Δm give two bounds:
    the plain difference of means, and the same with AtP*'s per-prompt scores
    as a control variate (each subset's Δm less its nodes' scores). The true
    largest unverified mean |Δm| comes from the exhaustive table.
    """
    order = comparison.estimates["atpstar"].argsort(descending=True, stable=True).tolist()
    rest = sorted(order[k:])
    nodes = [comparison.nodes[i] for i in rest]
    assert comparison.estimates_per_prompt is not None
    control = comparison.estimates_per_prompt["atpstar"][:, rest]
    start = time.perf_counter()
    subsets = draw_subsets(len(nodes), samples, p, 0)
    delta_m, known_zero, undefined, rows = subset_patch(
        model, saes, pairs.clean, pairs.lengths, METRIC, pairs.answer, pairs.wrong, nodes,
        subsets, corrupt_tokens=pairs.corrupt, named_positions=pairs.named_positions,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    results = {}
    for name, variate in (("plain", None), ("control", control)):
        sums = certification_sums(delta_m, subsets, known_zero, undefined, 0.05, rows=rows,
                                  control=variate)  # fmt: skip
        results[name] = certification_result(
            nodes, sums, samples=samples, p=p, confidence=0.95, seed=0, mode="corrupt",
            n_prompts=int(pairs.clean.shape[0]), control=None if variate is None else "atpstar",
        )  # fmt: skip
    true_max = max(float(comparison.truth[i]) for i in rest)
    worst = comparison.nodes[max(rest, key=lambda i: float(comparison.truth[i]))]
    print(f"  certify after verifying AtP*'s top {k}: {len(rest)} nodes, {samples} subsets "
          f"(p = {p}), {rows} patched rows, {seconds:.1f}s; true largest unverified "
          f"{true_max:.3f} ({worst})")  # fmt: skip
    for name, result in results.items():
        print(f"    {name:8s} {result.statement()}; bound / true {result.theta / true_max:.2f}; "
              f"closest by estimate {result.closest_node}, binding {result.binding_node}")  # fmt: skip
    return {"results": results, "true_max": true_max, "passes": samples, "worst": str(worst)}


def _tables(path: str | None, compute: Callable[[], RankingComparison]) -> RankingComparison:
    """The exhaustive comparison, from ``path`` when it holds one, else computed (and saved)."""
    if path and os.path.exists(path):
        print(f"  exhaustive tables read from {path}")
        return torch.load(path, weights_only=False)
    comparison = compute()
    if path:
        torch.save(comparison, path)
    return comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--recall-prompts", type=int, default=8)
    parser.add_argument("--scan-prompts", type=int, default=4)
    parser.add_argument("--naive-sample", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on the shared 2-core machine, at load 6-10, "
        "two threads spun against the other jobs and a one-prompt forward pass took 5-8 s, "
        "against ~1.1 s with one; the whole run then finished in 17 min)",
    )
    parser.add_argument(
        "--recall-subsets",
        type=int,
        default=1,
        help="also print recall@20 on this many disjoint subsets of the recall prompts "
        "(how much the figure moves with the prompts drawn)",
    )
    parser.add_argument(
        "--skip-timing",
        action="store_true",
        help="recall only: skip the forward-equivalent and scan timings (their JSON keys are null)",
    )
    parser.add_argument("--certify-samples", type=int, default=800)
    parser.add_argument("--certify-p", type=float, default=0.1)
    parser.add_argument(
        "--tables",
        help="keep the exhaustive patching tables in this file prefix (PREFIX.heads.pt, "
        "PREFIX.features.pt): read when present, else computed and written; the same prompts "
        "and node sets are the caller's to keep",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from circuitscan.services.model_loading import load_model
    from circuitscan.services.sae_loading import load_default_saes

    start = time.perf_counter()
    model = load_model().model
    loaded = load_default_saes(model)
    saes = {item.site: item.sae for item in loaded}
    # As a job worker does after loading (services/jobs/worker.py): keep the
    # long-lived objects out of the garbage collector's full collections.
    gc.collect()
    gc.freeze()
    n_layers = model.cfg.n_layers
    print(f"model and SAEs loaded in {time.perf_counter() - start:.1f}s; {n_layers} layers; "
          f"SAEs at {[item.site.label for item in loaded]}")  # fmt: skip

    equivalents: dict[str, float | None] = dict.fromkeys(METHODS)
    ratio = None
    if not args.skip_timing:
        print("AtP / AtP* cost in forward passes (one prompt pair, every node):")
        timed = forward_equivalents(model, saes, args.rounds)
        equivalents.update(timed)
        print(f"  AtP {timed['atp']:.2f} (target <= 3.5), AtP* {timed['atpstar']:.2f} "
              f"(target <= {3 + n_layers}), AtP2 {timed['atp2']:.2f} (target <= 5), "
              f"AtP*2 {timed['atpstar2']:.2f}")  # fmt: skip

        print("feature-ablation scan:")
        resid_site = HookSite(layer=15, point="resid_post")
        ratio = scan_efficiency(model, saes[resid_site], resid_site, args.scan_prompts,
                                args.naive_sample, args.rounds)  # fmt: skip

    print(f"IOI rankings vs exhaustive exact patching ({args.recall_prompts} prompt pairs):")
    pairs = ioi_pairs(model, args.recall_prompts)
    prefix = f"{args.tables}.{args.recall_prompts}" if args.tables else None
    heads = _tables(
        prefix and f"{prefix}.heads.pt",
        lambda: compare_rankings(model, saes, pairs, ioi_head_selections(), methods=METHODS),
    )
    _stamp(start, "head rankings and exhaustive head patching")
    heads_frozen = explain_misses(model, saes, pairs, heads)
    report("heads", heads, heads_frozen, args.recall_subsets)
    _stamp(start, "head misses explained")
    sites = [item.site.label for item in loaded]
    features = _tables(
        prefix and f"{prefix}.features.pt",
        lambda: compare_rankings(
            model, saes, pairs, ioi_feature_selections(sites), methods=METHODS
        ),
    )
    _stamp(start, "feature rankings and exhaustive feature patching")
    report("features", features, explain_misses(model, saes, pairs, features), args.recall_subsets)
    _stamp(start, "feature misses explained")
    n_missed, n_mediated = pattern_mediated(heads, heads_frozen, "atpstar")
    print(f"  AtP* misses {n_missed} of the true top-20 heads; {n_mediated} of them change their "
          "mean |Δm| by more than half when later attention patterns are frozen")  # fmt: skip
    costs = {name: heads.cost(name, 20) for name in METHODS}
    known = {name: cost for name, cost in costs.items() if cost is not None}
    best = min(known, key=lambda name: known[name]) if known else None
    print(f"  cost of verified recall of the true top-20 heads: {costs}; best {best}")
    bound = missed_effect_bound(
        model, saes, pairs, heads, k=20, samples=args.certify_samples, p=args.certify_p
    )
    _stamp(start, "certification")
    results = bound["results"]
    assert isinstance(results, dict)
    theta, plain = results["control"].theta, results["plain"].theta
    true_max = float(bound["true_max"])  # type: ignore[arg-type]
    passes = bound["passes"]
    print(f"  bound / true = {theta / true_max:.2f} with AtP* as control variate, "
          f"{plain / true_max:.2f} without (targets: >= 1, <= 2)")  # fmt: skip
    print(f"total {time.perf_counter() - start:.1f}s")
    print(json.dumps({
        "atp_forward_equivalents": _rounded(equivalents["atp"]),
        "atpstar_forward_equivalents": _rounded(equivalents["atpstar"]),
        "n_layers": n_layers,
        "scan_vs_ideal_ratio": _rounded(ratio),
        "recall_at_20_heads_atpstar": heads.recall("atpstar", 20),
        "recall_at_20_features_atpstar": features.recall("atpstar", 20),
        "recall_at_20_heads_atp": heads.recall("atp", 20),
        "recall_at_20_features_atp": features.recall("atp", 20),
        "verified_recall_cost_at_20_heads_atpstar": heads.cost("atpstar", 20),
        "verified_recall_cost_at_20_heads_atp": heads.cost("atp", 20),
        "verified_recall_cost_at_20_features_atpstar": features.cost("atpstar", 20),
        "recall_at_20_heads_atp2": heads.recall("atp2", 20),
        "recall_at_20_features_atp2": features.recall("atp2", 20),
        "recall_at_20_heads_atpstar2": heads.recall("atpstar2", 20),
        "atp2_forward_equivalents": _rounded(equivalents["atp2"]),
        "atpstar2_forward_equivalents": _rounded(equivalents["atpstar2"]),
        "verified_recall_cost_at_20_heads_best": None if best is None else known[best],
        "verified_recall_cost_at_20_heads_atp2": costs["atp2"],
        "verified_recall_cost_at_20_heads_atpstar2": costs["atpstar2"],
        "missed_effect_bound_heads": _rounded(theta),
        "true_max_unverified_heads": _rounded(true_max),
        "certify_forward_passes": passes,
        "missed_effect_bound_over_true": _rounded(theta / true_max),
        "missed_effect_bound_covers": int(theta >= true_max),
        "missed_effect_bound_heads_plain": _rounded(plain),
        "missed_effect_bound_plain_over_true": _rounded(plain / true_max),
        "missed_effect_closest_node": results["control"].closest_node,
        "true_max_unverified_node": bound["worst"],
        "certify_p": args.certify_p,
        "recall_prompts": args.recall_prompts,
        "heads_atpstar_misses": n_missed,
        "heads_atpstar_misses_pattern_mediated": n_mediated,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
