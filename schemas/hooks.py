"""Hook sites: typed places in a transformer where we read or intervene.

A hook site is a layer plus a point. It is turned into a TransformerLens hook
name here and nowhere else, so that every module agrees on spelling: per-block
names through ``HookSite.hook_name`` / ``block_hook(layer, point)``, the few
hooks outside the blocks (embeddings, the final norm's scale) as constants.
tests/unit/test_layers.py refuses a hook-name literal anywhere else.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from circuitscan.schemas.errors import UserInputError

HookPoint = Literal[
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "z",
    "q",
    "k",
    "v",
    "rot_q",
    "rot_k",
    "pattern",
    "attn_scores",
    "mlp_post",
    "mlp_pre",
    "ln1_scale",
    "ln2_scale",
]

# TransformerLens spells points that live inside a sub-module with a prefix.
_SUBMODULE: dict[str, str] = {
    "z": "attn",
    "q": "attn",
    "k": "attn",
    "v": "attn",
    "rot_q": "attn",
    "rot_k": "attn",
    "pattern": "attn",
    "attn_scores": "attn",
    "mlp_post": "mlp",
    "mlp_pre": "mlp",
    "ln1_scale": "ln1",
    "ln2_scale": "ln2",
}
_TL_POINT: dict[str, str] = {
    "mlp_post": "post",
    "mlp_pre": "pre",
    "ln1_scale": "scale",
    "ln2_scale": "scale",
}
# (sub-module, TransformerLens point) → our point, for parsing hook names back.
_POINT_OF: dict[tuple[str | None, str], str] = {
    (_SUBMODULE.get(point), _TL_POINT.get(point, point)): point for point in get_args(HookPoint)
}

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(?:(attn|mlp|ln1|ln2)\.)?hook_([a-z_]+)$")

# Hooks outside the blocks (no layer), spelled here like the per-block ones.
EMBED_HOOK = "hook_embed"
POS_EMBED_HOOK = "hook_pos_embed"
FINAL_LN_SCALE_HOOK = "ln_final.hook_scale"


class HookSite(BaseModel):
    """A (layer, point) place in the residual computation of a transformer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(ge=0, description="Transformer block index, 0-based.")
    point: HookPoint = Field(description="Which activation inside the block.")

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name, e.g. ``blocks.6.attn.hook_z``."""
        tl_point = _TL_POINT.get(self.point, self.point)
        sub = _SUBMODULE.get(self.point)
        prefix = f"blocks.{self.layer}." + (f"{sub}." if sub else "")
        return f"{prefix}hook_{tl_point}"

    @property
    def label(self) -> str:
        """Short stable label used as a store key, e.g. ``L6.z``."""
        return f"L{self.layer}.{self.point}"

    @classmethod
    def from_hook_name(cls, name: str) -> HookSite:
        """Parse a TransformerLens hook name back into a site."""
        match = _HOOK_RE.match(name)
        if match is None:
            raise UserInputError(f"not a per-block TransformerLens hook name: {name!r}")
        layer, sub, tl_point = int(match.group(1)), match.group(2), match.group(3)
        point = _POINT_OF.get((sub, tl_point))
        if point is None:
            raise UserInputError(f"unsupported hook name: {name!r}")
        site = cls(layer=layer, point=point)  # type: ignore[arg-type]
        if site.hook_name != name:
            raise UserInputError(f"unsupported hook name: {name!r}")
        return site

    @classmethod
    def parse(cls, text: str) -> HookSite:
        """Accept either a label (``L6.z``) or a TransformerLens hook name."""
        label = re.match(r"^L(\d+)\.([a-z0-9_]+)$", text)
        if label:
            return cls(layer=int(label.group(1)), point=label.group(2))  # type: ignore[arg-type]
        return cls.from_hook_name(text)

    def __str__(self) -> str:
        return self.label


def block_hook(layer: int, point: HookPoint) -> str:
    """The TransformerLens hook name of ``point`` in block ``layer``, e.g. ``blocks.3.ln1.hook_scale``."""
    return HookSite(layer=layer, point=point).hook_name
