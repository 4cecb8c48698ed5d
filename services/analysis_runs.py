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

Each run_* picks a sensible default (the feature with the largest attribution,
the head attending most from END to IO) and takes explicit choices as keyword
arguments. The reference distribution for mean ablation is the IOI prompts'
ABC-corrupted counterparts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer

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
    splice_eval,
)
from circuitscan.pipelines.analyses.feature_choice import feature_attributions
from circuitscan.pipelines.attribution import patch_path
from circuitscan.pipelines.attribution.patch_path import DEFAULT_FRACTIONS
from circuitscan.pipelines.batching import TokenBatch, tokenize_prompts
from circuitscan.pipelines.tasks.ioi import generate_ioi
from circuitscan.schemas.analyses import (
    AnalysisContext,
    DFAOutput,
    HeadFeatureLogitOutput,
    PatchPathNode,
    PatchPathOutput,
    QKPairsOutput,
    SpliceEvalOutput,
)
from circuitscan.schemas.attribution import Node
from circuitscan.schemas.hooks import HookSite, block_hook
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.analysis_saving import save_outputs
from circuitscan.services.reports import report_sections

Echo = Callable[[str], None]
METRIC = MetricSpec()  # logit difference answer − wrong at the last token


@dataclass
class Setup:
    """A model, its SAEs by site label, a task prompt set and its reference (ABC) prompts."""

    model: HookedSAETransformer
    saes: dict[str, SAE]
    records: list[PromptRecord]
    batch: TokenBatch
    reference: TokenBatch
    context: AnalysisContext


def ioi_setup(
    n_prompts: int = 16,
    seed: int = 0,
    *,
    model: HookedSAETransformer | Any | None = None,
    model_name: str | None = None,
    saes: dict[str, SAE] | list[Any] | None = None,
    model_source: str | None = None,
    sae_sources: list[str] | None = None,
) -> Setup:
    """Load (or take) the model and SAEs, and generate ``n_prompts`` seeded IOI prompts.

    Defaults: the default model and its default SAEs. ``model`` may be a
    HookedSAETransformer or a ``LoadedModel``; ``saes`` a dict site label
    (``L15.z``) → SAE or a list of ``LoadedSAE`` (as ``load_default_saes`` returns).
    """
    if n_prompts < 2:
        raise AnalysisInputError(f"need at least 2 prompts, got {n_prompts}")
    if model is None:
        from circuitscan.schemas.models import ModelSpec
        from circuitscan.services.model_loading import load_model

        model = load_model(ModelSpec(source=model_source) if model_source else None)
    if not isinstance(model, HookedSAETransformer):  # a LoadedModel
        model_name = model_name or model.name
        model = model.model
    if saes is None:
        from circuitscan.services.sae_loading import load_default_saes, load_sae

        saes = (
            [load_sae(s, model) for s in sae_sources] if sae_sources else load_default_saes(model)
        )
    if isinstance(saes, list):
        saes = {loaded.site.label: loaded.sae for loaded in saes}
    if model.tokenizer is None:
        raise AnalysisInputError("IOI prompts need a model with a tokenizer")
    records = generate_ioi(model.tokenizer, n_prompts, seed=seed)
    batch = tokenize_prompts(model, records)
    reference = tokenize_prompts(model, [PromptRecord(text=r.corrupted or r.text) for r in records])
    context = AnalysisContext(
        model=model_name or model.cfg.model_name,
        saes=sorted(saes),
        task="ioi",
        n_prompts=n_prompts,
        seed=seed,
    )
    return Setup(model, saes, records, batch, reference, context)


def _sae(setup: Setup, label: str) -> SAE:
    if label not in setup.saes:
        raise AnalysisInputError(f"no SAE at {label}; loaded: {', '.join(sorted(setup.saes))}")
    return setup.saes[label]


def _first_site(setup: Setup, point: tuple[str, ...]) -> str:
    for label in sorted(setup.saes):
        if HookSite.from_hook_name(setup.saes[label].cfg.metadata.hook_name).point in point:
            return label
    raise AnalysisInputError(f"this analysis needs an SAE at one of {point}; have {setup.saes}")


def _positions(setup: Setup, name: str) -> torch.Tensor:
    return torch.tensor([r.positions[name] for r in setup.records])


def run_splice_eval(
    setup: Setup, *, layer_sets: list[list[str]] | None = None, batch_size: int = 16
) -> SpliceEvalOutput:
    """Each SAE alone, then all together (sequentially recomputed): metric and KL per variant."""
    labels = sorted(setup.saes)
    sets = layer_sets or [[s] for s in labels] + ([labels] if len(labels) > 1 else [])
    b, ref = setup.batch, setup.reference
    rows = splice_eval(
        setup.model, [setup.saes[s] for s in labels], b.tokens, b.lengths, METRIC,
        b.answer, b.wrong, layer_sets=sets, reference_tokens=ref.tokens,
        reference_lengths=ref.lengths, batch_size=batch_size,
    )  # fmt: skip
    return SpliceEvalOutput(
        context=setup.context,
        reference="IOI ABC prompts (IO, S1, S2 replaced by three other names)",
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
        positions[sl], METRIC, ans, wro,
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
) -> HeadFeatureLogitOutput:
    """The residual feature at the IO token that most helps IO over S, through every later head.

    Norm scales are frozen from ``prompt_index``'s forward pass (source IO,
    destination END); answer/wrong are that prompt's IO/S tokens.
    """
    _check_prompt(setup, prompt_index)
    label = site or _first_site(setup, ("resid_post", "resid_pre", "resid_mid"))
    src, dest = _positions(setup, "IO"), _positions(setup, "END")
    acts, attr = _attributions(setup, label, src, prompt_index)
    if feature is None:
        feature = int(attr.argmax())
    b = setup.batch
    if b.answer is None or b.wrong is None:
        raise AnalysisInputError("head→feature→logit needs answer and wrong tokens")
    tokens = b.tokens[prompt_index, : int(b.lengths[prompt_index])]
    src_pos, dest_pos = int(src[prompt_index]), int(dest[prompt_index])
    final_scale, input_scales = frozen_norm_scales(setup.model, tokens, src_pos, dest_pos)
    result = head_feature_logit(
        setup.model, _sae(setup, label), feature, int(b.answer[prompt_index]),
        int(b.wrong[prompt_index]), final_scale, input_scales=input_scales, top_k=top_k,
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
) -> DFAOutput:
    """DFA and recursive DFA of the attention-output feature at END with the largest attribution."""
    _check_prompt(setup, prompt_index)
    label = site or _first_site(setup, ("z",))
    layer = HookSite.from_hook_name(_sae(setup, label).cfg.metadata.hook_name).layer
    dest = _positions(setup, "END")
    acts, attr = _attributions(setup, label, dest, prompt_index)
    if feature is None:
        active = acts > 0
        if not bool(active.any()):
            raise AnalysisInputError(
                f"no {label} feature is active at END of prompt {prompt_index}"
            )
        feature = int(torch.where(active, attr.abs(), -1.0).argmax())
    pruning = pruning or Pruning(max_depth=3, top_k=6, min_frac=0.05)
    tokens = setup.batch.tokens[prompt_index, : int(setup.batch.lengths[prompt_index])]
    saes = list(setup.saes.values())
    dest_pos = int(dest[prompt_index])
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
def _mean_attention(setup: Setup, layer: int, dest: str, src: str) -> torch.Tensor:
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
    dest: str = "S2",
    src: str = "S1",
    top_n: int = 20,
) -> QKPairsOutput:
    """QK pair tables (dest→src) of the head reading the residual SAE's site, over all prompts.

    Default: from the second mention of the subject (S2) to its first (S1), the
    duplicate-name lookup of IOI, on the head of that layer with the largest
    mean attention dest→src.
    """
    label = site or _first_site(setup, ("resid_post", "resid_pre"))
    hook_site = HookSite.from_hook_name(_sae(setup, label).cfg.metadata.hook_name)
    layer = hook_site.layer + (1 if hook_site.point == "resid_post" else 0)
    if layer >= setup.model.cfg.n_layers:
        raise AnalysisInputError(f"no attention layer reads {label}")
    for name in (dest, src):
        if name not in setup.records[0].positions:
            raise AnalysisInputError(
                f"unknown position {name!r}; IOI has {sorted(setup.records[0].positions)}"
            )
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
        dest=dest,
        src=src,
        mean_attention=float(attention[head]),
        tables=tables,
        variance=qk_pair_variance(tables, top_n=top_n),
    )


def run_patch_path(
    setup: Setup, nodes: list[str], *, fractions: list[float] | None = None
) -> PatchPathOutput:
    """Exact, frozen-pattern and partial patches of ``nodes`` (e.g. ``v:L16:0@S1``) on the
    clean/ABC-corrupted prompt pairs, beside their AtP and AtP* estimates."""
    if not nodes:
        raise AnalysisInputError("name at least one node, e.g. v:L16:0@S1")
    parsed = [Node.parse(text) for text in nodes]
    b, ref = setup.batch, setup.reference
    if not torch.equal(b.lengths, ref.lengths):
        bad = int(torch.nonzero(b.lengths != ref.lengths)[0, 0])
        raise AnalysisInputError(
            f"prompt {bad}'s corrupted version has {int(ref.lengths[bad])} tokens, the clean one "
            f"{int(b.lengths[bad])}: patching pairs positions one to one"
        )
    path = patch_path(
        setup.model, list(setup.saes.values()), b.tokens, ref.tokens, b.lengths, METRIC, b.answer, b.wrong,
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
        corruption="IOI ABC prompts (IO, S1, S2 replaced by three other names)",
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
