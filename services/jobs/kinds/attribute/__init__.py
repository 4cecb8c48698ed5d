"""The ``attribute`` kind: AtP / AtP* over clean/corrupted prompt pairs.

Workers sum each node's per-prompt scores per shard (``worker.py``); the
driver pools the shards' sums into exact means, ranks the nodes, and
optionally verifies the top ones by exact patching in a second, read-only
pass on the workers (:meth:`AttributeRunner.verify_nodes`), pooled the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from circuitscan.schemas.breakdown import Breakdown, PerPromptArray
from circuitscan.schemas.certification import AutoVerification, CertificationResult
from circuitscan.schemas.job_results import (
    CONFIRM_BAND,
    AttributionJobResult,
    NodeEffect,
    NodeVerification,
    VerificationStatus,
)
from circuitscan.schemas.jobs import AttributeParams, JobSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.job_kind import (
    ApiPage,
    ApiView,
    BrowserColumn,
    BrowserView,
    CliView,
    JobKind,
    KindCheckError,
    MergeContext,
)
from circuitscan.services.jobs.kinds.attribute.worker import (
    AttributeRunner,
    CertifySumsPartial,
    Means,
    NodeSumsPartial,
    attribution_method,
    merge_node_sums,
    node_selection,
)
from circuitscan.services.jobs.planning import plan_shards
from circuitscan.services.jobs.shard_runner import ShardRunner

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer

    from circuitscan.services.reports import Section
    from circuitscan.services.sae_loading import LoadedSAE
    from circuitscan.services.store import FeatureStore

__all__ = ["AttributeKind", "attribution_method", "node_selection", "ranked_nodes"]


# --- driver side -----------------------------------------------------------------------


def verification_status(estimate: float, exact: float) -> VerificationStatus:
    """Sign and magnitude of the exact effect against the estimate (band: CONFIRM_BAND)."""
    if exact == 0.0:
        return "no_effect"
    if estimate == 0.0:
        return "underestimated"
    ratio = exact / estimate
    if ratio < 0:
        return "sign_flipped"
    if ratio > CONFIRM_BAND:
        return "underestimated"
    return "overestimated" if ratio < 1.0 / CONFIRM_BAND else "confirmed"


def status_ratio(estimate: float, exact: float) -> float | None:
    """exact / estimate, None when the estimate is 0 (or either is undefined)."""
    ratio = exact / estimate if estimate != 0.0 else None
    return None if ratio is None or ratio != ratio else ratio


def certified_line(certification: CertificationResult) -> str:
    """``no unverified node exceeds θ (95 %)``, with what it cost and who came closest."""
    return certification.summary_line()


def ranked_nodes(estimates: Means, k: int) -> list[str]:
    """The k nodes of largest total |score| over the prompt set (ties: by name).

    Ranking by the mean over only the prompts where a node exists would put
    a late position that two long prompts reach above one that every prompt
    has; the total is the mean over all prompts with an absent node counting 0.
    """
    defined = [(name, v) for name, v in estimates.items() if v[2] > 0]
    defined.sort(key=lambda item: (-item[1][1] * item[1][2], item[0]))
    return [name for name, _ in defined[:k]]


def attribution_result(
    spec: JobSpec,
    n_prompts: int,
    estimates: Means,
    exact: Means | None = None,
    certification: CertificationResult | None = None,
    per_prompt_exact: PerPromptArray | None = None,
) -> AttributionJobResult:
    assert isinstance(spec.job, AttributeParams)
    top = []
    for name in ranked_nodes(estimates, spec.job.top_nodes):
        mean, mean_abs, n = estimates[name]
        check = None
        if exact is not None and name in exact:
            e_mean, e_abs, e_n = exact[name]
            check = NodeVerification(
                exact_mean=e_mean,
                exact_mean_abs=e_abs,
                n_prompts=e_n,
                status=verification_status(mean, e_mean),
                ratio=status_ratio(mean, e_mean),
            )
        top.append(
            NodeEffect(node=name, mean=mean, mean_abs=mean_abs, n_prompts=n, verification=check)
        )
    return AttributionJobResult(
        job_hash=spec.content_hash(),
        method=spec.job.method,
        n_prompts=n_prompts,
        n_nodes=len(estimates),
        n_verified=len(exact or {}),
        top=top,
        certification=certification,
        per_prompt_exact=per_prompt_exact,
    )


def certify_rest(
    params: AttributeParams,
    estimates: Means,
    verified: set[str],
    ctx: MergeContext,
    confidence: float | None = None,
) -> CertificationResult | None:
    """θ over every scored node not in ``verified``, from shards run on the workers
    (at ``confidence``, default the spec's: auto verification splits δ over its rounds)."""
    from circuitscan.pipelines.attribution.subset_stats import (
        CertificationSums,
        certification_result,
    )

    certify = params.certify
    assert certify is not None
    rest = sorted(name for name, v in estimates.items() if v[2] > 0 and name not in verified)
    if not rest:
        ctx.say("certify: every scored node was verified; nothing left to bound")
        return None
    level = certify.confidence if confidence is None else confidence
    ctx.say(f"certifying {len(rest)} unverified nodes with {certify.samples} random subsets")
    kept = ctx.kept
    # One union bound over every (node, prompt) pair of the job, so shards' bounds add up.
    union = len(rest) * len(kept)
    plans = plan_shards(len(kept), ctx.spec.shard_size)
    parts: list[CertifySumsPartial] = ctx.fan_out(
        "certify_nodes",
        [(ctx.shard_prompts(p.start, p.stop), rest, union, 1.0 - level) for p in plans],
    )
    import torch

    sums = CertificationSums.merge(
        CertificationSums(
            estimate=torch.tensor(part.estimate_sum, dtype=torch.float64),
            estimate_abs=torch.tensor(part.estimate_abs_sum, dtype=torch.float64),
            upper=torch.tensor(part.upper_sum, dtype=torch.float64),
            defined=torch.tensor(part.defined, dtype=torch.float64),
            included=torch.tensor(part.included, dtype=torch.float64),
            rows=part.rows,
        )
        for part in parts
    )
    return certification_result(
        rest,
        sums,
        samples=certify.samples,
        p=certify.p,
        confidence=level,
        seed=certify.seed,
        mode="corrupt",
        n_prompts=len(kept),
    )


def verified_per_prompt(parts: list[NodeSumsPartial], nodes: list[str]) -> np.ndarray:
    """[prompt, node] exact Δm of the verification passes, in prompt order (NaN: absent)."""
    blocks = []
    for part in parts:
        assert part.per_prompt is not None
        column = {name: i for i, name in enumerate(part.nodes)}
        blocks.append(part.per_prompt[:, [column[name] for name in nodes]])
    if not blocks:
        return np.zeros((0, len(nodes)), dtype=np.float32)
    return np.concatenate(blocks, axis=0).astype(np.float32)


def attribution_breakdown(
    store: FeatureStore, result: AttributionJobResult, field: str, top: int
) -> Breakdown:
    """The top nodes' estimate (and verified exact Δm) averaged per value of a prompt field."""
    from circuitscan.services.jobs.breakdown import GroupMeans, grouped_partials, no_per_prompt
    from circuitscan.services.store.results import read_job_array

    nodes = [effect.node for effect in result.top[:top]]
    verified = result.per_prompt_exact
    quantities = {"estimate": f"mean {result.method} estimate (metric units)"}
    if verified is not None:
        quantities["exact"] = "mean exact Δm of patching the node (verified nodes; metric units)"
    means = GroupMeans(quantities)
    labels: list[str] = []
    for _start, groups, part in grouped_partials(store, NodeSumsPartial, field, means):
        if part.per_prompt is None:
            raise no_per_prompt("attribute")
        labels += groups
        column = {name: i for i, name in enumerate(part.nodes)}
        for name in nodes:
            if name in column:
                means.add(name, "estimate", groups, part.per_prompt[:, column[name]])
    if verified is not None:
        groups = labels
        exact = read_job_array(store, verified)
        for i, name in enumerate(verified.columns):
            if name in nodes:
                means.add(name, "exact", groups, exact[:, i])
    return means.breakdown("attribute", field, nodes)


class AttributionResults(ApiPage):
    """A page of an attribute job's top nodes, with the job's summary."""

    job_hash: str = Field(description="JobSpec.content_hash() of the job.")
    method: str = Field(description="Estimator: atp or atpstar.")
    n_prompts: int = Field(description="Prompt pairs aggregated.")
    n_nodes: int = Field(description="Distinct nodes scored.")
    n_verified: int = Field(description="Top nodes checked by exact patching.")
    certification: CertificationResult | None = Field(
        default=None, description="Bound θ on every unverified node (certify); None when off."
    )
    certified: str | None = Field(
        default=None, description="The bound in words: no unverified node exceeds θ (95 %)."
    )
    certificate: str | None = Field(
        default=None, description="The bound in words with its cost and the closest node."
    )
    auto_verification: AutoVerification | None = Field(
        default=None, description="verify_top_k: auto: nodes verified and what ended it."
    )
    verified_complete: str | None = Field(
        default=None, description="verify_top_k: auto in words: top-K complete at 95 % or not."
    )
    offset: int = Field(description="Rank of the first node of this page (0 = best).")
    limit: int = Field(description="Page size asked for.")
    total: int = Field(description="Top nodes the job kept.")
    nodes: list[NodeEffect] = Field(
        description="Nodes by mean |effect|, with scores and verification status."
    )


class AttributeKind(JobKind[AttributeParams, AttributionJobResult]):
    name = "attribute"
    params = AttributeParams
    result = AttributionJobResult
    partial = NodeSumsPartial
    api = ApiView(
        path="/attribution",
        name="attribution",
        summary="Top nodes of an attribute job (scores, verification status)",
        page=AttributionResults,
        rows_from="top",
        rows_to="nodes",
    )
    browser = BrowserView(
        query="attribution?limit=20",
        title="attribute ({method}) · {n_prompts} prompt pairs · top {#nodes} of {n_nodes} "
        "nodes, {n_verified} verified by exact patching",
        rows="nodes",
        columns=[
            BrowserColumn(name="node", field="node"),
            BrowserColumn(name="mean effect", field="mean", cell="num"),
            BrowserColumn(name="mean |estimate|", field="mean_abs", cell="num"),
            BrowserColumn(name="exact mean", field="verification.exact_mean", cell="num"),
            BrowserColumn(name="exact / est.", field="verification.ratio", cell="num3"),
            BrowserColumn(name="status", field="verification.status"),
        ],
        breakdown=True,
        notes=["certificate", "verified_complete"],
    )

    def runner(
        self, spec: JobSpec, model: HookedSAETransformer, saes: list[LoadedSAE]
    ) -> ShardRunner:
        return AttributeRunner(spec, model, saes)

    def check_prompts(self, params: AttributeParams, records: list[PromptRecord]) -> None:
        missing = [i for i, r in enumerate(records) if r.corrupted is None]
        if missing:
            raise KindCheckError(
                f"attribute jobs need a corrupted prompt for every prompt; {len(missing)} of "
                f"{len(records)} have none (first: prompt {missing[0]})"
            )

    def position_names(self, params: AttributeParams) -> list[str]:
        if isinstance(params.positions, list):
            return [name for name in params.positions if name != "last"]
        return []

    def position_notes(self, params: AttributeParams, kept: list[PromptRecord]) -> list[str]:
        """Warnings for ``positions: all`` on prompts whose named roles sit at different indices.

        Attribution nodes are keyed by token index, so with mixed templates a node
        ``@15`` pools different tokens (END in one prompt, a name in another).
        """
        if params.positions != "all":
            return []
        indices: dict[str, set[int]] = defaultdict(set)
        for record in kept:
            for name, index in record.positions.items():
                indices[name].add(index)
        spread = {name: len(found) for name, found in indices.items() if len(found) > 1}
        if not spread:
            return []
        where = ", ".join(f"{name} at {n} indices" for name, n in sorted(spread.items()))
        return [
            f"note: positions: all keys nodes by token index, but these prompts put {where}; "
            f"nodes at one index pool different tokens. Name the positions instead "
            f"(positions: {sorted(indices)}) to compare like with like."
        ]

    def merge(
        self, params: AttributeParams, partials: Iterable[NodeSumsPartial], ctx: MergeContext
    ) -> AttributionJobResult:
        estimates = merge_node_sums(partials)
        exact = None
        if params.verify_top_k == "auto":
            from circuitscan.services.jobs.kinds.attribute.auto_verify import verify_auto

            return verify_auto(params, estimates, ctx)
        if params.verify_top_k:
            nodes = ranked_nodes(estimates, params.verify_top_k)
            ctx.say(f"verifying the top {len(nodes)} nodes by exact patching")
            kept = ctx.kept
            plans = plan_shards(len(kept), ctx.spec.shard_size)
            parts = ctx.fan_out(
                "verify_nodes", [(ctx.shard_prompts(p.start, p.stop), nodes) for p in plans]
            )
            # Each pass returns every node asked for (count 0 where none existed).
            exact = merge_node_sums(parts)
            stored = None
            if ctx.write_array is not None:
                stored = ctx.write_array("verify_delta", verified_per_prompt(parts, nodes), nodes)
            certification = None
            if params.certify is not None:
                certification = certify_rest(params, estimates, set(nodes), ctx)
            return attribution_result(
                ctx.spec, ctx.n_prompts, estimates, exact, certification, per_prompt_exact=stored
            )
        return attribution_result(ctx.spec, ctx.n_prompts, estimates, exact)

    def cli_view(self, result: AttributionJobResult, top: int) -> CliView:
        rows = []
        for rank, e in enumerate(result.top[:top], start=1):
            v = e.verification
            rows.append(
                (rank, e.node, result.rank_score(e), e.mean, e.mean_abs, e.n_prompts)
                + ((v.exact_mean, v.ratio, v.status) if v else (None, None, None))
            )
        header = (
            f"attribute ({result.method}): {result.n_prompts} prompts, "
            f"{result.n_nodes} nodes, {result.n_verified} verified by exact patching"
        )
        if result.certification is not None:
            header += "; " + certified_line(result.certification)
        if result.auto_verification is not None:
            header += "; " + result.auto_verification.statement()
        return CliView(
            header=header,
            columns=[
                "rank",
                "node",
                "score",
                "mean",
                "mean_abs",
                "prompts",
                "exact_mean",
                "ratio",
                "status",
            ],
            rows=rows,
        )

    def breakdown(
        self, store: FeatureStore, result: AttributionJobResult, field: str, top: int
    ) -> Breakdown:
        return attribution_breakdown(store, result, field, top)

    def report_section(self, result: AttributionJobResult, plots: Path) -> Section:
        from circuitscan.services.reports import (
            Figure,
            Section,
            Table,
            atp_vs_exact_scatter,
            attribution_bars,
        )

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
                    check.ratio if check else None,
                    check.status if check else "",
                ]
            )
        return Section(
            title=f"Attribution ({result.method}) over {result.n_prompts} clean/corrupted pairs",
            paragraphs=[
                f"{result.n_nodes} nodes scored; the top {result.n_verified} were patched "
                f"exactly (confirmed: exact / estimate within 1/{CONFIRM_BAND:g}…{CONFIRM_BAND:g}; "
                "under- / overestimated outside it; sign_flipped: opposite sign).",
                *([certified_line(result.certification) + "."] if result.certification else []),
                *([result.verified_complete + "."] if result.verified_complete else []),
            ],
            tables=[
                Table(
                    ["node", "mean", "mean |·|", "exact mean", "exact / est.", "verification"], rows
                )
            ],
            figures=figures,
        )
