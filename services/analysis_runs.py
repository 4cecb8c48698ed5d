"""Circuit analyses on a task prompt set, as plain functions (the ``analyze`` CLI calls these).

Python API::

    setup = ioi_setup(n_prompts=16, seed=0)            # default model + SAEs + IOI prompts
    splice = run_splice_eval(setup)                     -> SpliceEvalOutput
    hfl = run_head_feature_logit(setup)                 -> HeadFeatureLogitOutput
    tree = run_dfa(setup)                               -> DFAOutput
    qk = run_qk_pairs(setup)                            -> QKPairsOutput
    path = run_patch_path(setup, ["v:L16:0@S1"])        -> PatchPathOutput
    index, outputs = run_ioi_report(out_dir)            # the four analyses, saved and reported

Saving (JSON files, the HTML report, a feature store) is
:mod:`circuitscan.services.analysis_saving`; terminal text is
:mod:`circuitscan.services.analysis_text`.

Any prompt source a job spec takes works the same way:
``prompt_setup(analysis_inputs(spec=Path("job.yaml")))`` or
``analysis_inputs(prompts_file=Path("rows.jsonl"))``
(:mod:`circuitscan.services.analysis_prompts`); positions are names the
prompts carry, 0-based indices (BOS at 0) or ``last``.

Each run_* picks a sensible default (the feature with the largest attribution,
the head attending most from dest to src) and takes explicit choices as keyword
arguments. The reference distribution for mean ablation (and what patch-path
patches towards) is the prompts' corrupted counterparts (IOI: ABC prompts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from circuitscan.pipelines.analyses import (
    AnalysisInputError,
    Pruning,
    check_tree_sums,
    dfa,
    frozen_norm_scales,
    head_feature_logit,
    qk_feature_pairs_batch,
    qk_pair_variance,
    recursive_dfa,
    source_attention,
    splice_eval,
)
from circuitscan.pipelines.analyses.feature_choice import feature_attributions
from circuitscan.pipelines.attribution import patch_path
from circuitscan.pipelines.attribution.patch_path import DEFAULT_FRACTIONS
from circuitscan.schemas.analyses import (
    DFAOutput,
    HeadFeatureLogitOutput,
    PatchPathNode,
    PatchPathOutput,
    QKPairsOutput,
    SpliceEvalOutput,
)
from circuitscan.schemas.attribution import Node
from circuitscan.schemas.hooks import HookSite, block_hook
from circuitscan.services.analysis_prompts import (
    Setup,
    analysis_inputs,
    ioi_setup,
    metric_position,
    named_everywhere,
    positions_of,
    prompt_setup,
)
from circuitscan.services.analysis_saving import save_outputs
from circuitscan.services.reports import report_sections

Echo = Callable[[str], None]
Position = str | int  # a name the prompts carry, a 0-based index (BOS at 0) or "last"

__all__ = ["Setup", "analysis_inputs", "ioi_setup", "prompt_setup"]


def _sae(setup: Setup, label: str) -> SAE:
    if label not in setup.saes:
        raise AnalysisInputError(f"no SAE at {label}; loaded: {', '.join(sorted(setup.saes))}")
    return setup.saes[label]


def _first_site(setup: Setup, point: tuple[str, ...]) -> str:
    for label in sorted(setup.saes):
        if HookSite.from_hook_name(setup.saes[label].cfg.metadata.hook_name).point in point:
            return label
    raise AnalysisInputError(f"this analysis needs an SAE at one of {point}; have {setup.saes}")


def _positions(setup: Setup, name: Position) -> torch.Tensor:
    return positions_of(setup, name)


def _default(setup: Setup, position: Position | None, name: str) -> Position:
    """``position``, else IOI's ``name`` where every prompt names it, else the metric's."""
    if position is not None:
        return position
    return name if named_everywhere(setup, name) else metric_position(setup)


def run_splice_eval(
    setup: Setup, *, layer_sets: list[list[str]] | None = None, batch_size: int = 16
) -> SpliceEvalOutput:
    """Each SAE alone, then all together (sequentially recomputed): metric and KL per variant."""
    labels = sorted(setup.saes)
    sets = layer_sets or [[s] for s in labels] + ([labels] if len(labels) > 1 else [])
    b, ref = setup.batch, setup.reference
    rows = splice_eval(
        setup.model, [setup.saes[s] for s in labels], b.tokens, b.lengths, setup.metric,
        b.answer, b.wrong, layer_sets=sets, reference_tokens=ref.tokens,
        reference_lengths=ref.lengths, batch_size=batch_size,
    )  # fmt: skip
    return SpliceEvalOutput(
        context=setup.context,
        reference=setup.reference_label,
        reference_prompts=int(ref.tokens.shape[0]),
        rows=rows,
    )


def _attributions(setup: Setup, label: str, positions: torch.Tensor, prompt_index: int):
    b = setup.batch
    sl = slice(prompt_index, prompt_index + 1)
    ans = None if b.answer is None else b.answer[sl]
    wro = None if b.wrong is None else b.wrong[sl]
    acts, attr = feature_attributions(
        setup.model, _sae(setup, label), b.tokens[sl], b.lengths[sl],
        positions[sl], setup.metric, ans, wro,
    )  # fmt: skip
    return acts[0], attr[0]


def _check_prompt(setup: Setup, prompt_index: int) -> None:
    if not 0 <= prompt_index < len(setup.records):
        raise AnalysisInputError(
            f"prompt index {prompt_index} outside the {len(setup.records)} prompts"
        )


def run_head_feature_logit(
    setup: Setup,
    *,
    site: str | None = None,
    feature: int | None = None,
    prompt_index: int = 0,
    top_k: int = 8,
    src: Position | None = None,
    dest: Position | None = None,
) -> HeadFeatureLogitOutput:
    """The residual feature at ``src`` that most helps answer over wrong, through every later head.

    Norm scales and attention weights are frozen from ``prompt_index``'s
    forward pass; answer/wrong are that prompt's tokens. Defaults: source IO
    and destination END where the prompts name them (IOI), else the metric's
    position (the last token). Each head gets its effect per unit of the
    feature at full attention and the prompt's actual contribution (× the
    feature's activation × the head's attention dest → src).
    """
    _check_prompt(setup, prompt_index)
    label = site or _first_site(setup, ("resid_post", "resid_pre", "resid_mid"))
    src_at = _positions(setup, _default(setup, src, "IO"))
    dest_at = _positions(setup, _default(setup, dest, "END"))
    acts, attr = _attributions(setup, label, src_at, prompt_index)
    if feature is None:
        feature = int(attr.argmax())
    b = setup.batch
    if b.answer is None or b.wrong is None:
        raise AnalysisInputError("head→feature→logit needs answer and wrong tokens")
    tokens = b.tokens[prompt_index, : int(b.lengths[prompt_index])]
    src_pos, dest_pos = int(src_at[prompt_index]), int(dest_at[prompt_index])
    if not 0 <= feature < acts.shape[0]:
        raise AnalysisInputError(f"feature {feature} out of range for d_sae {acts.shape[0]}")
    final_scale, input_scales = frozen_norm_scales(setup.model, tokens, src_pos, dest_pos)
    attention = source_attention(setup.model, tokens, src_pos, dest_pos)
    result = head_feature_logit(
        setup.model, _sae(setup, label), feature, int(b.answer[prompt_index]),
        int(b.wrong[prompt_index]), final_scale, input_scales=input_scales, top_k=top_k,
        activation=float(acts[feature]), attention=attention,
    )  # fmt: skip
    return HeadFeatureLogitOutput(
        context=setup.context,
        prompt_index=prompt_index,
        src_pos=src_pos,
        dest_pos=dest_pos,
        answer=setup.records[prompt_index].answer,
        wrong=setup.records[prompt_index].wrong,
        feature_activation=float(acts[feature]),
        feature_attribution=float(attr[feature]),
        result=result,
    )


def run_dfa(
    setup: Setup,
    *,
    site: str | None = None,
    feature: int | None = None,
    prompt_index: int = 0,
    pruning: Pruning | None = None,
    dest: Position | None = None,
) -> DFAOutput:
    """DFA and recursive DFA of the attention-output feature at ``dest`` with the largest
    |attribution| (default dest: END where the prompts name it, else the metric's position)."""
    _check_prompt(setup, prompt_index)
    label = site or _first_site(setup, ("z",))
    layer = HookSite.from_hook_name(_sae(setup, label).cfg.metadata.hook_name).layer
    where = _default(setup, dest, "END")
    dest_at = _positions(setup, where)
    acts, attr = _attributions(setup, label, dest_at, prompt_index)
    if feature is None:
        active = acts > 0
        if not bool(active.any()):
            raise AnalysisInputError(
                f"no {label} feature is active at {where} of prompt {prompt_index}"
            )
        feature = int(torch.where(active, attr.abs(), -1.0).argmax())
    pruning = pruning or Pruning(max_depth=3, top_k=6, min_frac=0.05)
    tokens = setup.batch.tokens[prompt_index, : int(setup.batch.lengths[prompt_index])]
    saes = list(setup.saes.values())
    dest_pos = int(dest_at[prompt_index])
    result = dfa(setup.model, saes, tokens, feature, layer, dest_pos)
    tree = recursive_dfa(setup.model, saes, tokens, feature, layer, dest_pos, pruning)
    return DFAOutput(
        context=setup.context,
        prompt_index=prompt_index,
        text=setup.records[prompt_index].text,
        feature_attribution=float(attr[feature]),
        pruning={k: float(v) for k, v in vars(pruning).items()},
        result=result,
        tree=tree,
        max_sum_error=check_tree_sums(tree),
    )


@torch.no_grad()
def _mean_attention(setup: Setup, layer: int, dest: Position, src: Position) -> torch.Tensor:
    name = block_hook(layer, "pattern")
    _, cache = setup.model.run_with_cache(
        setup.batch.tokens, names_filter=lambda n: n == name, stop_at_layer=layer + 1
    )
    rows = torch.arange(setup.batch.tokens.shape[0])
    pattern = cache[name][rows, :, _positions(setup, dest), _positions(setup, src)]
    return pattern.mean(0)  # per head


def run_qk_pairs(
    setup: Setup,
    *,
    site: str | None = None,
    head: int | None = None,
    dest: Position | None = None,
    src: Position | None = None,
    top_n: int = 20,
) -> QKPairsOutput:
    """QK pair tables (dest→src) of the head reading the residual SAE's site, over all prompts.

    Default: from the second mention of the subject (S2) to its first (S1), the
    duplicate-name lookup of IOI, on the head of that layer with the largest
    mean attention dest→src. Prompts that do not name S1 and S2 need both given.
    """
    label = site or _first_site(setup, ("resid_post", "resid_pre"))
    hook_site = HookSite.from_hook_name(_sae(setup, label).cfg.metadata.hook_name)
    layer = hook_site.layer + (1 if hook_site.point == "resid_post" else 0)
    if layer >= setup.model.cfg.n_layers:
        raise AnalysisInputError(f"no attention layer reads {label}")
    if dest is None or src is None:
        if not (named_everywhere(setup, "S2") and named_everywhere(setup, "S1")):
            names = sorted({n for r in setup.records for n in r.positions})
            raise AnalysisInputError(
                "qk-pairs needs --dest and --src on prompts that do not name S2 and S1 (IOI); "
                f"these name {', '.join(names) or 'no positions'} (or give an index, or last)"
            )
        dest, src = dest or "S2", src or "S1"
    attention = _mean_attention(setup, layer, dest, src)
    head = int(attention.argmax()) if head is None else head
    if not 0 <= head < setup.model.cfg.n_heads:
        raise AnalysisInputError(f"head {head} out of range for {setup.model.cfg.n_heads} heads")
    b = setup.batch
    tables = qk_feature_pairs_batch(
        setup.model, _sae(setup, label), b.tokens, b.lengths, layer, head,
        _positions(setup, dest).tolist(), _positions(setup, src).tolist(),
    )  # fmt: skip
    return QKPairsOutput(
        context=setup.context,
        dest=str(dest),
        src=str(src),
        mean_attention=float(attention[head]),
        tables=tables,
        variance=qk_pair_variance(tables, top_n=top_n),
    )


def run_patch_path(
    setup: Setup, nodes: list[str], *, fractions: list[float] | None = None
) -> PatchPathOutput:
    """Exact, frozen-pattern and partial patches of ``nodes`` (e.g. ``v:L16:0@S1``) on the
    clean/corrupted prompt pairs (IOI: ABC), beside their AtP and AtP* estimates."""
    if not nodes:
        raise AnalysisInputError("name at least one node, e.g. v:L16:0@S1")
    parsed = [Node.parse(text) for text in nodes]
    if not setup.paired:
        bad = next(i for i, r in enumerate(setup.records) if r.corrupted is None)
        raise AnalysisInputError(
            f"patch-path patches each prompt towards its corrupted counterpart; prompt {bad} "
            "has no 'corrupted' text"
        )
    b, ref = setup.batch, setup.reference
    if not torch.equal(b.lengths, ref.lengths):
        bad = int(torch.nonzero(b.lengths != ref.lengths)[0, 0])
        raise AnalysisInputError(
            f"prompt {bad}'s corrupted version has {int(ref.lengths[bad])} tokens, the clean one "
            f"{int(b.lengths[bad])}: patching pairs positions one to one"
        )
    path = patch_path(
        setup.model, list(setup.saes.values()), b.tokens, ref.tokens, b.lengths, setup.metric,
        b.answer, b.wrong,
        parsed, named_positions=[dict(r.positions) for r in setup.records],
        fractions=fractions or DEFAULT_FRACTIONS,
    )  # fmt: skip
    flips = path.sign_changes()
    entries = [
        PatchPathNode(
            node=str(node),
            exact=path.exact[:, i].tolist(),
            frozen_later_patterns=path.frozen[:, i].tolist(),
            partial=[step[:, i].tolist() for step in path.partial],
            estimates={name: v[:, i].tolist() for name, v in path.estimates.items()},
            ranking_scores={name: v[:, i].tolist() for name, v in path.scores.items()},
            mean_abs_exact=float(path.exact[:, i].abs().mean()),
            mean_abs_frozen=float(path.frozen[:, i].abs().mean()),
            sign_changes=int(flips[i]),
        )
        for i, node in enumerate(path.nodes)
    ]
    return PatchPathOutput(
        context=setup.context,
        corruption=setup.reference_label,
        fractions=path.fractions,
        nodes=entries,
    )


def run_ioi_report(
    out_dir: Path, *, n_prompts: int = 12, seed: int = 0, setup: Setup | None = None,
    store: str | None = None, echo: Echo = print,
) -> tuple[Path, list[Any]]:  # fmt: skip
    """All four analyses on IOI, one HTML report with every plot; returns (index, outputs)."""
    started = time.perf_counter()
    setup = setup or ioi_setup(n_prompts, seed)
    echo(f"model and SAEs ready ({', '.join(setup.context.saes)}) in "
         f"{time.perf_counter() - started:.0f}s")  # fmt: skip
    outputs: list[Any] = []
    for name, fn in (
        ("splice evaluation", run_splice_eval),
        ("head→feature→logit", run_head_feature_logit),
        ("DFA", run_dfa),
        ("QK pairs", run_qk_pairs),
    ):
        t = time.perf_counter()
        outputs.append(fn(setup))  # type: ignore[operator]
        echo(f"{name}: {time.perf_counter() - t:.1f}s")
    splice, hfl, tree, qk = outputs
    sections = report_sections(out_dir, splice=splice, hfl=hfl, dfa=tree, qk=qk)
    index = save_outputs(out_dir, outputs, sections, "IOI circuit analyses", store)
    echo(f"report: {index} ({time.perf_counter() - started:.0f}s in all)")
    return index, outputs
