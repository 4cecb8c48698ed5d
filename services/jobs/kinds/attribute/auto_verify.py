"""``verify_top_k: auto``: verify in rounds until certify shows the top-K complete.

The driver ranks the nodes, then per round verifies the next ``top_k`` of them
on the actors (``verify_nodes``) and certifies the rest (``certify_nodes``),
with the same schedule, stop rule and per-round confidence as
``pipelines.attribution.certify.verify_until_certified`` (both read them from
``pipelines.attribution.subset_stats``), so a job equals the direct pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from circuitscan.schemas.certification import AutoVerification, CertificationResult
from circuitscan.schemas.job_results import AttributionJobResult
from circuitscan.schemas.jobs import AttributeParams
from circuitscan.services.jobs.kinds.attribute.worker import (
    Means,
    NodeSumsPartial,
    merge_node_sums,
)
from circuitscan.services.jobs.planning import plan_shards

if TYPE_CHECKING:
    from circuitscan.services.jobs.job_kind import MergeContext


def verify_auto(
    params: AttributeParams, estimates: Means, ctx: MergeContext
) -> AttributionJobResult:
    """The job result of an auto verification, with ``auto_verification`` saying what ended it."""
    from circuitscan.pipelines.attribution.subset_stats import (
        auto_schedule,
        auto_stop,
        smallest_top_effect,
    )
    from circuitscan.services.jobs.kinds.attribute import (
        attribution_result,
        certify_rest,
        ranked_nodes,
        verified_per_prompt,
    )

    certify = params.certify
    assert certify is not None and params.verify_top_k == "auto"
    top_k = certify.top_k or 20
    ranked = ranked_nodes(estimates, len(estimates))
    schedule = auto_schedule(len(ranked), top_k, certify.budget)
    round_confidence = 1.0 - (1.0 - certify.confidence) / len(schedule)
    plans = plan_shards(len(ctx.kept), ctx.spec.shard_size)
    parts: list[NodeSumsPartial] = []
    blocks: list[np.ndarray] = []
    certification: CertificationResult | None = None
    stop, passes, done, rounds = None, 0, 0, 0
    smallest, theta = 0.0, None
    for size in schedule:
        rounds += 1
        nodes = ranked[done:size]
        ctx.say(f"auto verification round {rounds}: verifying nodes {done + 1}–{size}")
        found = ctx.fan_out(
            "verify_nodes", [(ctx.shard_prompts(p.start, p.stop), nodes) for p in plans]
        )
        parts += found
        if found and all(part.per_prompt is not None for part in found):
            blocks.append(verified_per_prompt(found, nodes))
        passes += len(nodes)
        done = size
        exact = merge_node_sums(parts)
        smallest = smallest_top_effect([exact[n][1] for n in ranked[:done] if exact[n][2]], top_k)
        certification = None
        if done < len(ranked):
            certification = certify_rest(
                params, estimates, set(ranked[:done]), ctx, confidence=round_confidence
            )
        theta = None if certification is None else certification.theta
        passes += 0 if certification is None else certification.forward_passes
        stop = auto_stop(theta, smallest, done, len(ranked), schedule[-1])
        if stop is not None:
            break
    assert stop is not None
    summary = AutoVerification(
        top_k=top_k, budget=schedule[-1], verified=done, rounds=rounds,
        max_rounds=len(schedule), stopped_by=stop,  # type: ignore[arg-type]
        smallest_top_effect=smallest, theta=theta, confidence=certify.confidence,
        forward_passes=passes,
    )  # fmt: skip
    ctx.say(summary.statement())
    verified = ranked[:done]
    stored = None
    if ctx.write_array is not None and len(blocks) == rounds:
        stored = ctx.write_array("verify_delta", np.concatenate(blocks, axis=1), verified)
    result = attribution_result(
        ctx.spec, ctx.n_prompts, estimates, merge_node_sums(parts), certification,
        per_prompt_exact=stored,
    )  # fmt: skip
    return result.model_copy(update={"auto_verification": summary})
