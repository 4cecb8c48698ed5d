"""Node kinds: one row per kind of thing the attribution engine can intervene on.

This table is the one vocabulary for node kinds. A kind's ``name`` is what
``Node.kind`` and ``NodeSelection.kinds`` hold and the prefix of its node names
in results and stores (``v`` in ``v:L16:0@S1``), so names never change. Attribute
job specs also accept the older spellings (``head_z``, ``sae_feature``, ...) as
aliases; nothing else does.

The rows here are pure data. How each kind's tensors are counted, read,
patched and reduced, and which AtP* QK-fix computation it takes, is the
matching row of ``pipelines/attribution/node_kinds.py``. GradDrop needs no
column: it treats a node by where its hook sits (``graddrop.relation``): a
hook inside a block gets a zero gradient when that block is dropped, a
residual-stream hook (an SAE there) keeps the identity path.

Adding a kind: a row here (its name and alias in the Literals below), a row in
``pipelines/attribution/node_kinds.py``, and a ``HookSite`` point if its hook is
new.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookPoint

NodeKind = Literal["feature", "sae_error", "z", "q", "k", "v", "neuron", "mlp"]
NodeKindAlias = Literal["sae_feature", "head_z", "head_q", "head_k", "head_v", "mlp_neuron"]
# What an attribute job spec may write: a name or an older alias.
NodeKindSpelling = Literal[NodeKind, NodeKindAlias]
Unit = Literal["feature", "head", "kv_head", "neuron"]
Reads = Literal["sae_feature", "sae_error", "hook"]


class NodeKindSpec(BaseModel):
    """One node kind: where it hooks, what its index counts, how AtP* treats it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: NodeKind = Field(
        description="The kind's name in code, and the prefix of its node names in results "
        "(e.g. 'v' in 'v:L16:0@S1')."
    )
    alias: NodeKindAlias | None = Field(
        default=None, description="Older spelling still accepted in attribute job specs."
    )
    reads: Reads = Field(
        description="Which value at the hook is the node: the spliced SAE's feature "
        "activations, its error term, or the hook's own activation."
    )
    point: HookPoint | None = Field(
        description="Hook point of a 'hook' kind; None for SAE kinds, which sit at the site "
        "of the SAE they read."
    )
    unit: Unit | None = Field(
        description="What the node index counts: SAE features, query heads, key/value heads "
        "(fewer than query heads under GQA) or MLP neurons; None: one node per layer and "
        "position (the whole error term, the whole MLP layer)."
    )
    qk_fix: Literal["query", "key"] | None = Field(
        default=None,
        description="AtP*'s QK fix recomputes the softmax exactly for this side of the "
        "attention score (query: the node's row, key: the node's column); None: plain AtP.",
    )
    needs_mlp: bool = Field(default=False, description="Exists only in models with MLPs.")
    description: str = Field(description="One line for help texts.")

    @property
    def sae(self) -> bool:
        """Read from a spliced SAE (and so needs one at its site)."""
        return self.reads != "hook"

    @property
    def indexed(self) -> bool:
        """One node per unit (feature, head, neuron) rather than one per layer and position."""
        return self.unit is not None

    @property
    def restricted_by(self) -> Literal["features", "heads"] | None:
        """The NodeSelection field that narrows this kind's units, if any."""
        if self.unit == "feature":
            return "features"
        if self.unit in ("head", "kv_head"):
            return "heads"
        return None


NODE_KINDS: dict[NodeKind, NodeKindSpec] = {
    spec.name: spec
    for spec in (
        NodeKindSpec(name="feature", alias="sae_feature", reads="sae_feature", point=None,
                     unit="feature", description="an SAE feature's activation"),
        NodeKindSpec(name="sae_error", reads="sae_error", point=None, unit=None,
                     description="an SAE's error term (input minus reconstruction)"),
        NodeKindSpec(name="z", alias="head_z", reads="hook", point="z", unit="head",
                     description="an attention head's output before W_O"),
        NodeKindSpec(name="q", alias="head_q", reads="hook", point="q", unit="head",
                     qk_fix="query", description="an attention head's query"),
        NodeKindSpec(name="k", alias="head_k", reads="hook", point="k", unit="kv_head",
                     qk_fix="key", description="a key/value head's key"),
        NodeKindSpec(name="v", alias="head_v", reads="hook", point="v", unit="kv_head",
                     description="a key/value head's value"),
        NodeKindSpec(name="neuron", alias="mlp_neuron", reads="hook", point="mlp_post",
                     unit="neuron", needs_mlp=True, description="one MLP neuron's activation"),
        NodeKindSpec(name="mlp", reads="hook", point="mlp_post", unit=None, needs_mlp=True,
                     description="a whole MLP layer's hidden activation (all its neurons)"),
    )
}  # fmt: skip

_SPELLINGS: dict[str, NodeKindSpec] = {
    spelling: spec
    for spec in NODE_KINDS.values()
    for spelling in (spec.name, spec.alias)
    if spelling is not None
}
# The Literals above are what pydantic validates and mypy checks; the table must match them.
if set(NODE_KINDS) != set(get_args(NodeKind)) or set(_SPELLINGS) != set(
    get_args(NodeKind) + get_args(NodeKindAlias)
):
    raise RuntimeError("NODE_KINDS and the NodeKind/NodeKindAlias Literals disagree")


def node_kind(spelling: str) -> NodeKindSpec:
    """The row for a kind name or an older job-spec alias (``head_z`` → the ``z`` row)."""
    spec = _SPELLINGS.get(spelling)
    if spec is None:
        raise UserInputError(f"unknown node kind {spelling!r}; kinds: {', '.join(NODE_KINDS)}")
    return spec


def canonical_kinds(spellings: list[str]) -> list[NodeKind]:
    """Kind names for a list of names and/or aliases, first occurrence kept, in order."""
    return list(dict.fromkeys(node_kind(s).name for s in spellings))


def kinds_help() -> str:
    """The kind names with the older spellings job specs accept, for help texts."""
    aliases = ", ".join(f"{s.alias} = {s.name}" for s in NODE_KINDS.values() if s.alias)
    return f"{', '.join(NODE_KINDS)} (older spellings accepted: {aliases})"
