"""Attribution nodes, node selections, methods and result summaries.

A *node* is one thing the attribution engine can intervene on: an SAE feature
or SAE error term at a hook site and position, an attention head's output
(``z``), query, key or value at a position, an MLP neuron at a position, or a
whole MLP layer at a position. Its string form is stable and parseable, e.g.
``feature:L6.resid_pre:1234@IO``, ``z:L9:3@last``, ``k:L2:1@7``, ``mlp:L4@5``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookPoint, HookSite
from circuitscan.schemas.node_kinds import NODE_KINDS, NodeKind, node_kind

PatchMode = Literal["corrupt", "zero", "mean"]
AblationMode = Literal["zero", "mean", "resample", "corrupted"]
PositionSpec = int | str

_NODE_RE = re.compile(
    r"^(?P<kind>[a-z_]+):L(?P<layer>\d+)(?:\.(?P<point>[a-z_]+))?(?::(?P<index>\d+))?"
    r"@(?P<pos>-?\d+|[A-Za-z_][A-Za-z0-9_]*)$"
)


class Node(BaseModel):
    """One intervention target: (kind, layer, SAE site point, unit index, position)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: NodeKind = Field(description="What is intervened on.")
    layer: int = Field(ge=0, description="Transformer block index, 0-based.")
    point: HookPoint | None = Field(
        default=None,
        description="Hook point of the SAE for feature/sae_error nodes; None for other kinds.",
    )
    index: int | None = Field(
        default=None,
        ge=0,
        description="Feature, query head, key/value head (GQA: KV-head index) or neuron index; "
        "None for sae_error and mlp (whole-layer) nodes.",
    )
    position: PositionSpec = Field(
        description="Absolute token position (BOS counted), 'last' (last real token) or a "
        "named position from the prompt's labels (e.g. 'IO', 'S2')."
    )

    @model_validator(mode="after")
    def _check(self) -> Node:
        spec = NODE_KINDS[self.kind]
        if spec.sae != (self.point is not None):
            raise ValueError(f"{self.kind} nodes {'need' if spec.sae else 'take no'} a point")
        if spec.indexed != (self.index is not None):
            raise ValueError(f"{self.kind} nodes {'need an' if spec.indexed else 'take no'} index")
        if isinstance(self.position, int) and self.position < 0:
            raise ValueError(f"position must be >= 0, got {self.position}")
        return self

    @property
    def site(self) -> HookSite:
        """The hook site whose activation this node is part of."""
        # SAE kinds sit at their SAE's site (the node's point); other kinds at a fixed point.
        point = self.point if self.point is not None else NODE_KINDS[self.kind].point
        assert point is not None  # guaranteed by the validator
        return HookSite(layer=self.layer, point=point)

    def __str__(self) -> str:
        where = f"L{self.layer}" + (f".{self.point}" if self.point is not None else "")
        index = "" if self.index is None else f":{self.index}"
        return f"{self.kind}:{where}{index}@{self.position}"

    @classmethod
    def parse(cls, text: str) -> Node:
        """Inverse of ``str(node)``."""
        match = _NODE_RE.match(text)
        if match is None:
            raise UserInputError(f"not a node string: {text!r}")
        raw_pos: str = match["pos"]
        pos: PositionSpec = int(raw_pos) if raw_pos.lstrip("-").isdigit() else raw_pos
        index = match["index"]
        spec = node_kind(match["kind"])
        if spec.name != match["kind"]:  # an alias: node names use the kind's name only
            raise UserInputError(
                f"not a node string: {text!r} ({match['kind']!r} is a job-spec spelling; "
                f"node names write {spec.name!r})"
            )
        return cls(
            kind=spec.name,
            layer=int(match["layer"]),
            point=match["point"],  # type: ignore[arg-type]
            index=None if index is None else int(index),
            position=pos,
        )


class NodeSelection(BaseModel):
    """Which nodes to score. Every listed kind is taken at every chosen layer and position."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kinds: list[NodeKind] = Field(description="Node kinds to include (at least one).")
    layers: list[int] | None = Field(
        default=None, description="Layers to include; None for all layers."
    )
    positions: Literal["all", "last"] | list[PositionSpec] = Field(
        default="all",
        description="'all' real positions, 'last' real token, or a list of absolute indices "
        "and/or named positions.",
    )
    sae_sites: list[str] | None = Field(
        default=None,
        description="Site labels (e.g. 'L6.resid_pre') whose SAEs give feature/sae_error "
        "nodes; None for every SAE passed in.",
    )
    features: list[int] | None = Field(
        default=None, description="Restrict feature nodes to these indices; None for all."
    )
    heads: list[int] | None = Field(
        default=None,
        description="Restrict head nodes to these indices (query heads for z/q, KV heads for "
        "k/v); None for all.",
    )


# Method names → (qk_fix, graddrop, second_order); the first spelling of each is the one
# ``name`` reports.
_METHOD_NAMES: dict[str, tuple[bool, bool, bool]] = {
    "atp": (False, False, False),
    "atpstar": (True, True, False),
    "atp*": (True, True, False),
    "atp_qk": (True, False, False),
    "atp+qk": (True, False, False),
    "atp_graddrop": (False, True, False),
    "atp+graddrop": (False, True, False),
    "atp2": (False, False, True),
    "atpstar2": (True, True, True),
    "atp*2": (True, True, True),
    "atp_qk2": (True, False, True),
    "atp+qk+2": (True, False, True),
    "atp_graddrop2": (False, True, True),
    "atp+graddrop+2": (False, True, True),
}


class AttributionMethod(BaseModel):
    """How scores are estimated: AtP, AtP* (QK fix and/or GradDrop), and the second-order term."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    qk_fix: bool = Field(default=False, description="Exact softmax rows for q/k nodes.")
    graddrop: bool = Field(default=False, description="Per-layer gradient-drop scores.")
    second_order: bool = Field(
        default=False,
        description="Add the Hessian-vector-product term ½ Δ_n·(H Δ)_n along the patch of the "
        "selected nodes (one extra backward pass; see pipelines/attribution/second_order.py).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: object) -> object:
        # A method is also written by name ("atpstar", "atp+qk", ...), in code and in specs.
        if not isinstance(data, str):
            return data
        flags = _METHOD_NAMES.get(data.strip().lower().replace(" ", ""))
        if flags is None:
            raise ValueError(
                f"unknown attribution method {data!r}; expected one of {', '.join(_METHOD_NAMES)}"
            )
        return {"qk_fix": flags[0], "graddrop": flags[1], "second_order": flags[2]}

    @classmethod
    def parse(cls, method: AttributionMethod | str) -> AttributionMethod:
        """A method from its name (``"atp"``, ``"atpstar"``, ``"atp+qk"``, ``"atp+graddrop"``,
        ``"atp2"``, ``"atpstar2"``, or the ``name`` it reports, e.g. ``"atp_qk"``); a method is
        returned as it is."""
        return method if isinstance(method, AttributionMethod) else cls.model_validate(method)

    @property
    def name(self) -> str:
        if self.qk_fix and self.graddrop:
            base = "atpstar"
        elif self.qk_fix:
            base = "atp_qk"
        else:
            base = "atp_graddrop" if self.graddrop else "atp"
        return base + "2" if self.second_order else base


class NodeScore(BaseModel):
    """A node's effect aggregated over a prompt set, in metric units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str = Field(description="The node's string form (see Node).")
    mean: float = Field(description="Mean signed effect over the prompts where it is defined.")
    mean_abs: float = Field(description="Mean absolute effect over the same prompts.")


class AttributionSummary(BaseModel):
    """The top nodes of one attribution run, ranked by mean absolute effect."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(description="atp, atp_qk, atp_graddrop, atpstar or feature_attribution.")
    n_prompts: int = Field(ge=0, description="Prompts (or prompt pairs) aggregated.")
    n_nodes: int = Field(ge=0, description="Nodes scored.")
    top: list[NodeScore] = Field(description="Highest mean-absolute-effect nodes, best first.")


class VerificationReport(BaseModel):
    """How well an estimated ranking finds the true top-K nodes (by exact patching)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(ge=1, description="Size of the true top set.")
    recall_at_k: float = Field(
        ge=0, le=1, description="Share of the true top-K in the estimated top-K."
    )
    cost_of_verified_recall: int | None = Field(
        description="Nodes patched in estimated order until all true top-K were found; "
        "None when the budget ran out first."
    )
    found: int = Field(ge=0, description="True top-K nodes found within the budget.")
    budget: int = Field(ge=0, description="Most nodes the verification was allowed to patch.")
