"""AtP* GradDrop: gradients with one layer's residual contributions cut.

For layer l, the backward pass is rerun with the gradient through layer l's
attention and MLP outputs set to zero. Everything downstream of layer l is
unchanged, so the gradient arriving at ``resid_post_l`` is the clean one,
and cutting both outputs makes ``∂m/∂resid_pre_l = ∂m/∂resid_post_l``. The
dropped backward therefore only has to run *below* layer l, seeded at
``resid_pre_l`` with the clean ``∂m/∂resid_post_l``: one truncated backward
per layer, ``L`` in all, instead of ``L`` full ones. Tensors inside layer l
(heads, neurons, patterns, attention/MLP-output SAEs) get zero; tensors at
``resid_mid_l`` see only the identity path to ``resid_post_l``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from circuitscan.schemas.hooks import HookSite

Key = tuple[str, str]


def _where(key: Key) -> tuple[int, str]:
    site = HookSite.from_hook_name(key[1])
    if site.point in ("resid_pre", "resid_mid", "resid_post"):
        return site.layer, site.point.removeprefix("resid_")
    return site.layer, "inside"


def relation(layer: int, key: Key) -> str:
    """How dropping ``layer`` affects the gradient at ``key``: kept, zero or changed."""
    where_layer, where = _where(key)
    if where_layer > layer or (where_layer == layer and where == "post"):
        return "kept"
    if where_layer == layer and where == "inside":
        return "zero"
    return "changed"


def seed_keys(n_layers: int, keys: Sequence[Key]) -> set[Key]:
    """Recorded tensors GradDrop needs besides the nodes: residual hook outputs."""
    wanted: set[Key] = set()
    for layer in range(n_layers):
        wanted.add(("out", HookSite(layer=layer, point="resid_pre").hook_name))
        wanted.add(("out", HookSite(layer=layer, point="resid_post").hook_name))
    for key in keys:
        layer, where = _where(key)
        if where == "mid":
            wanted.add(("out", HookSite(layer=layer, point="resid_mid").hook_name))
    return wanted


def dropped_gradients(
    layer: int,
    keys: Sequence[Key],
    store: Mapping[Key, torch.Tensor],
    clean_grads: Mapping[Key, torch.Tensor],
) -> dict[Key, torch.Tensor]:
    """∂m/∂(each recorded tensor) with layer ``layer``'s attn/MLP outputs' gradient cut.

    ``store`` holds the clean forward's tensors (graph retained) including the
    residual hook outputs from :func:`seed_keys`; ``clean_grads`` holds the
    clean gradients of ``keys`` and of every ``resid_post`` output.
    """
    seed = clean_grads[("out", HookSite(layer=layer, point="resid_post").hook_name)]
    out: dict[Key, torch.Tensor] = {}
    below: list[Key] = []
    mid: list[Key] = []
    for key in keys:
        where_layer, where = _where(key)
        if where_layer > layer or (where_layer == layer and where == "post"):
            out[key] = clean_grads[key]
        elif where_layer == layer and where == "inside":
            out[key] = torch.zeros_like(clean_grads[key])
        elif where_layer == layer and where == "mid":
            mid.append(key)
        else:
            below.append(key)
    for start, targets in (("resid_pre", below), ("resid_mid", mid)):
        if not targets:
            continue
        origin = store[("out", HookSite(layer=layer, point=start).hook_name)]  # type: ignore[arg-type]
        grads = torch.autograd.grad(
            origin,
            [store[key] for key in targets],
            grad_outputs=seed,
            retain_graph=True,
            allow_unused=True,
        )
        for key, grad in zip(targets, grads, strict=True):
            out[key] = torch.zeros_like(store[key]) if grad is None else grad
    return out
