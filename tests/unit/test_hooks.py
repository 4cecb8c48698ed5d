"""HookSite spells every hook name TransformerLens has, and parses each one back."""

from __future__ import annotations

from typing import get_args

import pytest

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import (
    EMBED_HOOK,
    FINAL_LN_SCALE_HOOK,
    POS_EMBED_HOOK,
    HookPoint,
    HookSite,
    block_hook,
)
from circuitscan.testing import build_tiny_model


def test_every_point_is_a_real_hook_and_round_trips() -> None:
    # LayerNorm, standard positions: every point HookPoint names exists (rot_q/rot_k need rotary).
    model = build_tiny_model(normalization="LN")
    rotary = build_tiny_model(normalization="RMS", positional="rotary")
    for layer in range(model.cfg.n_layers):
        for point in get_args(HookPoint):
            site = HookSite(layer=layer, point=point)
            hooks = rotary.hook_dict if point.startswith("rot_") else model.hook_dict
            assert site.hook_name in hooks, site
            assert block_hook(layer, point) == site.hook_name
            assert HookSite.from_hook_name(site.hook_name) == site
            assert HookSite.parse(site.label) == site
    for name in (EMBED_HOOK, POS_EMBED_HOOK, FINAL_LN_SCALE_HOOK):
        assert name in model.hook_dict


def test_scale_hooks_are_spelled_like_transformer_lens() -> None:
    assert block_hook(3, "ln1_scale") == "blocks.3.ln1.hook_scale"
    assert block_hook(3, "ln2_scale") == "blocks.3.ln2.hook_scale"
    assert HookSite.from_hook_name("blocks.2.ln1.hook_scale").point == "ln1_scale"
    with pytest.raises(UserInputError):
        HookSite.from_hook_name("blocks.2.mlp.hook_scale")
    with pytest.raises(UserInputError):
        HookSite.from_hook_name("ln_final.hook_scale")  # model level: not a block site
