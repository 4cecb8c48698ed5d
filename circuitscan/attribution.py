"""``cs.attribute``, ``cs.exact_patch``, ``cs.certify``, ``cs.ablation_scan``: the engine by keyword.

Each call takes ``(model, saes, pairs, ...)``: the model, its SAEs as a
sequence (each SAE's site read from its own config; none are attached to the
model, the engine splices them in with their error terms kept) and a
:class:`~circuitscan.pipelines.prompt_pairs.PromptPairs`, whose tokens,
lengths, answers and named positions go to ``pipelines.attribution``
unchanged. Scores are in metric units (by default the logit difference
answer − wrong at the last real token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines import attribution as engine
from circuitscan.pipelines.attribution.ablation_scan import ScanResult
from circuitscan.pipelines.attribution.result import AttributionResult
from circuitscan.pipelines.caching import site_label
from circuitscan.pipelines.prompt_pairs import PromptPairs
from circuitscan.schemas.attribution import (
    AblationMode,
    AttributionMethod,
    Node,
    NodeKind,
    NodeScore,
    NodeSelection,
    PatchMode,
    PositionSpec,
)
from circuitscan.schemas.certification import CertificationResult
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec

Positions = Literal["all", "last"] | Sequence[PositionSpec]
MethodName = Literal["atp", "atpstar", "atp+qk", "atp+graddrop"]


def _named(pairs: PromptPairs) -> list[dict[str, int]] | None:
    return pairs.named_positions or None


def attribute(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]] | None,
    pairs: PromptPairs,
    method: MethodName | str | AttributionMethod = "atp",
    *,
    nodes: Sequence[NodeKind] | NodeSelection | None = None,
    positions: Positions = "all",
    layers: Sequence[int] | None = None,
    features: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    metric: MetricSpec | None = None,
) -> AttributionResult:
    """AtP or AtP* estimates of every selected node's effect on every prompt pair.

    ``method``: ``"atp"``, ``"atpstar"`` (QK fix and GradDrop), ``"atp+qk"``,
    ``"atp+graddrop"`` or an ``AttributionMethod``. ``nodes``: node kinds
    (``feature``, ``sae_error``, ``z``, ``q``, ``k``, ``v``, ``neuron``,
    ``mlp``), taken at every ``layers`` (default all) and ``positions``
    (``"all"``, ``"last"`` or indices / named positions such as ``"END"``), or
    a full ``NodeSelection``; default: the SAEs' features, or attention-head
    outputs when no SAEs are given. Without corrupted prompts in ``pairs``
    each score estimates zero-ablating the node. ``result.top(k)`` ranks the
    nodes; ``result.per_prompt()`` holds every score.

    >>> import circuitscan as cs
    >>> from circuitscan.testing import build_tiny_language_model, build_tiny_sae
    >>> model = build_tiny_language_model()
    >>> saes = [build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre"))]
    >>> pairs = cs.PromptPairs.from_strings(
    ...     model,
    ...     clean=["When Mary and John went to the store, John gave a drink to"],
    ...     corrupted=["When Alice and Bob went to the store, Carl gave a drink to"],
    ...     answers=[" Mary"],
    ...     wrong=[" John"],
    ... )
    >>> result = cs.attribute(model, saes, pairs, method="atpstar", nodes=["z", "feature"],
    ...                       positions=["last"])
    >>> result.method, len(result.nodes())  # 2 layers x 4 heads + 32 features, at one position
    ('atpstar', 40)
    >>> [score.node.split(":")[0] for score in result.top(40)].count("z")
    8
    """
    selection = (
        nodes
        if isinstance(nodes, NodeSelection)
        else NodeSelection(
            kinds=list(nodes) if nodes is not None else (["feature"] if saes else ["z"]),
            layers=None if layers is None else list(layers),
            positions=positions if isinstance(positions, str) else list(positions),
            features=None if features is None else list(features),
            heads=None if heads is None else list(heads),
        )
    )
    return engine.run_atp(
        model,
        list(saes or ()),
        pairs.clean,
        pairs.corrupt,
        pairs.lengths,
        metric or MetricSpec(),
        pairs.answer,
        pairs.wrong,
        selection,
        method=AttributionMethod.parse(method),
        named_positions=_named(pairs),
        corrupt_lengths=pairs.corrupt_lengths,
        position_map=pairs.position_map,
    )


def _node(node: Node | NodeScore | str) -> Node:
    if isinstance(node, Node):
        return node
    return Node.parse(node.node if isinstance(node, NodeScore) else node)


def exact_patch(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]] | None,
    pairs: PromptPairs,
    nodes: Sequence[Node | NodeScore | str],
    *,
    mode: PatchMode = "corrupt",
    reference: PromptPairs | None = None,
    metric: MetricSpec | None = None,
    batch_size: int = 64,
    freeze_later_patterns: bool = False,
    fraction: float = 1.0,
) -> Float[torch.Tensor, "batch n_nodes"]:
    """The true effect Δm = m(patched) − m(clean) of patching each node, one at a time.

    ``nodes``: ``Node`` s, their strings (``"z:L1:0@last"``) or the
    ``NodeScore`` s of ``attribute(...).top(k)``, to verify the estimates.
    ``mode``: ``"corrupt"`` (the node's value on the corrupted prompt),
    ``"zero"`` or ``"mean"`` (over ``reference`` prompts). Returns
    ``[n_prompts, n_nodes]`` in metric units; NaN where a node's position
    does not exist in a prompt. ``freeze_later_patterns`` and ``fraction``:
    see ``pipelines.attribution.exact_patch``.

    >>> import circuitscan as cs
    >>> from circuitscan.testing import build_tiny_language_model
    >>> model = build_tiny_language_model()
    >>> pairs = cs.PromptPairs.from_strings(
    ...     model,
    ...     clean=["When Mary and John went to the store, John gave a drink to"],
    ...     corrupted=["When Alice and Bob went to the store, Carl gave a drink to"],
    ...     answers=[" Mary"],
    ...     wrong=[" John"],
    ... )
    >>> top = cs.attribute(model, [], pairs, nodes=["z"], positions=["last"]).top(3)
    >>> delta = cs.exact_patch(model, [], pairs, top)
    >>> tuple(delta.shape)
    (1, 3)
    """
    return engine.exact_patch(
        model,
        list(saes or ()),
        pairs.clean,
        pairs.lengths,
        metric or MetricSpec(),
        pairs.answer,
        pairs.wrong,
        [_node(n) for n in nodes],
        mode=mode,
        corrupt_tokens=pairs.corrupt if mode == "corrupt" else None,
        corrupt_lengths=pairs.corrupt_lengths if mode == "corrupt" else None,
        reference_tokens=reference.clean if reference is not None else None,
        reference_lengths=reference.lengths if reference is not None else None,
        named_positions=_named(pairs),
        position_map=pairs.position_map if mode == "corrupt" else None,
        batch_size=batch_size,
        freeze_later_patterns=freeze_later_patterns,
        fraction=fraction,
    )


def certify(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]] | None,
    pairs: PromptPairs,
    nodes: Sequence[Node | NodeScore | str],
    *,
    verified: Sequence[Node | NodeScore | str] = (),
    samples: int,
    p: float = 0.25,
    confidence: float = 0.95,
    seed: int = 0,
    mode: PatchMode = "corrupt",
    reference: PromptPairs | None = None,
    metric: MetricSpec | None = None,
    batch_size: int = 64,
) -> CertificationResult:
    """A bound θ on the effect of every node not verified: no unverified node exceeds θ.

    ``nodes`` less ``verified`` (e.g. ``result.nodes()`` less the
    ``result.top(k)`` just checked with :func:`exact_patch`) are the
    unverified nodes; ``samples`` random subsets of them (each node in each
    with probability ``p``) are patched together, and θ bounds the largest
    mean |Δm| over the prompts of any of them at ``confidence`` (AtP*
    paper's diagnostic; assumes effects add up, see ``result.assumptions``).
    ``mode``/``reference`` as in :func:`exact_patch`.

    >>> import circuitscan as cs
    >>> from circuitscan.testing import build_tiny_language_model
    >>> model = build_tiny_language_model()
    >>> pairs = cs.PromptPairs.from_strings(
    ...     model,
    ...     clean=["When Mary and John went to the store, John gave a drink to"],
    ...     corrupted=["When Alice and Bob went to the store, Carl gave a drink to"],
    ...     answers=[" Mary"],
    ...     wrong=[" John"],
    ... )
    >>> result = cs.attribute(model, [], pairs, nodes=["z"], positions=["last"])
    >>> top = result.top(3)
    >>> bound = cs.certify(model, [], pairs, result.nodes(), verified=top, samples=16, p=0.5)
    >>> bound.n_nodes, bound.forward_passes
    (5, 16)
    >>> bound.statement().startswith("no unverified node exceeds")
    True
    """
    skip = {str(_node(n)) for n in verified}
    unverified = [node for node in (_node(n) for n in nodes) if str(node) not in skip]
    return engine.certify(
        model,
        list(saes or ()),
        pairs.clean,
        pairs.lengths,
        metric or MetricSpec(),
        pairs.answer,
        pairs.wrong,
        unverified,
        samples=samples,
        p=p,
        confidence=confidence,
        seed=seed,
        mode=mode,
        corrupt_tokens=pairs.corrupt if mode == "corrupt" else None,
        corrupt_lengths=pairs.corrupt_lengths if mode == "corrupt" else None,
        reference_tokens=reference.clean if reference is not None else None,
        reference_lengths=reference.lengths if reference is not None else None,
        named_positions=_named(pairs),
        position_map=pairs.position_map if mode == "corrupt" else None,
        batch_size=batch_size,
    )


def ablation_scan(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]],
    pairs: PromptPairs,
    *,
    mode: AblationMode = "zero",
    positions: Positions = "all",
    metric: MetricSpec | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, ScanResult]:
    """Exact Δm of ablating every active feature of each SAE at ``positions``, per clean prompt.

    Keyed by site label (e.g. ``"L1.resid_pre"``); ``result.delta[p, j]`` is
    the effect on prompt ``p`` of ablating ``result.features[j]`` (``zero``,
    ``mean`` or ``resample`` over the prompts' own chosen positions).

    >>> import circuitscan as cs
    >>> from circuitscan.testing import build_tiny_language_model, build_tiny_sae
    >>> model = build_tiny_language_model()
    >>> saes = [build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre"))]
    >>> pairs = cs.PromptPairs.from_strings(
    ...     model, clean=["When Mary and John went to the store, John gave a drink to"],
    ...     answers=[" Mary"], wrong=[" John"])
    >>> scans = cs.ablation_scan(model, saes, pairs, positions=["last"])
    >>> scan = scans["L1.resid_pre"]
    >>> scan.delta.shape[0], scan.delta.shape[1] == len(scan.features)
    (1, True)
    """
    out: dict[str, ScanResult] = {}
    for sae in saes:
        label = site_label(sae)
        out[label] = engine.ablation_scan(
            model,
            sae,
            HookSite.parse(label),
            pairs.clean,
            pairs.lengths,
            metric or MetricSpec(),
            pairs.answer,
            pairs.wrong,
            mode=mode,
            positions=positions if isinstance(positions, str) else list(positions),
            named_positions=_named(pairs),
            batch_size=batch_size,
            seed=seed,
        )
    return out
