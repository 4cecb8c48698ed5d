"""Recording and editing activations in one forward pass, with SAEs transparently spliced.

The splice itself is :func:`circuitscan.pipelines.sae_splice.transparent_splice`
(the model's output is unchanged and every feature activation and error term
gets its own exact gradient); this module decides, per hook, what a forward
pass records, which raw activations or SAE terms it edits, and where an SAE
has to be spliced for that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.attribution.errors import AttributionInputError
from circuitscan.pipelines.sae_splice import (
    SaeEdit,
    check_hooks,
    require_detached,
    transparent_splice,
)
from circuitscan.schemas.hooks import EMBED_HOOK

RawEdit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Recorder:
    """Which tensors a forward pass keeps, under keys ``(what, hook_name)``.

    ``what`` is ``act`` (the raw activation entering the hook), ``out`` (what
    the hook passes on, after any SAE splice), ``feat`` or ``err`` (the SAE's
    feature activations and error term at that hook).
    """

    wanted: set[tuple[str, str]] = field(default_factory=set)
    grad: bool = False
    store: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def keep(self, what: str, name: str, value: torch.Tensor) -> None:
        if (what, name) in self.wanted:
            self.store[(what, name)] = value


def check_saes(model: HookedSAETransformer, saes: Mapping[str, SAE[Any]]) -> None:
    """SAEs are passed to the engine, not attached to the model; their hooks must exist."""
    require_detached(model, "attributing", AttributionInputError)
    check_hooks(model, list(saes), AttributionInputError)


def _splice(
    sae: SAE[Any], x: torch.Tensor, name: str, recorder: Recorder, edit: SaeEdit | None
) -> torch.Tensor:
    out, acts, err = transparent_splice(sae, x, grad=recorder.grad, edit=edit)
    recorder.keep("feat", name, acts)
    recorder.keep("err", name, err)
    return out


def build_hooks(
    saes: Mapping[str, SAE[Any]],
    recorder: Recorder,
    *,
    sae_edits: Mapping[str, SaeEdit] | None = None,
    raw_edits: Mapping[str, RawEdit] | None = None,
) -> list[tuple[str, Callable[..., torch.Tensor]]]:
    """Forward hooks that record, edit raw activations, then splice SAEs where needed."""
    sae_edits = sae_edits or {}
    raw_edits = raw_edits or {}
    names = {name for _, name in recorder.wanted} | set(sae_edits) | set(raw_edits)
    hooks = []
    for name in sorted(names):
        sae = saes.get(name)
        needs_sae = sae is not None and (
            name in sae_edits
            or ("feat", name) in recorder.wanted
            or ("err", name) in recorder.wanted
        )
        if name in sae_edits and sae is None:
            raise AttributionInputError(f"no SAE at hook {name!r}")

        def hook(
            x: torch.Tensor,
            hook: object = None,
            *,
            _name: str = name,
            _sae: SAE[Any] | None = sae if needs_sae else None,
        ) -> torch.Tensor:
            recorder.keep("act", _name, x)
            if _name in raw_edits:
                x = raw_edits[_name](x)
            if _sae is not None:
                x = _splice(_sae, x, _name, recorder, sae_edits.get(_name))
            recorder.keep("out", _name, x)
            return x

        hooks.append((name, hook))
    return hooks


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Stop autograd from tracking weights; gradients are only wanted for activations."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def run_recorded(
    model: HookedSAETransformer,
    saes: Mapping[str, SAE[Any]],
    tokens: torch.Tensor,
    recorder: Recorder,
    *,
    stop_at_layer: int | None = None,
    **edits: Any,
) -> Float[torch.Tensor, "batch pos vocab"]:
    """One forward pass on right-padded ``tokens`` with recording/editing hooks; logits.

    With ``stop_at_layer``, only the blocks before it run and the residual
    stream ``[batch, pos, d_model]`` comes back instead of logits.
    """
    hooks = build_hooks(saes, recorder, **edits)
    if recorder.grad:
        # Gradients are needed w.r.t. activations only; making the embedding a
        # leaf that requires grad puts every downstream activation on the graph.
        def leaf(x: torch.Tensor, hook: object = None) -> torch.Tensor:
            return x.detach().requires_grad_(True)

        hooks = [(EMBED_HOOK, leaf), *hooks]
    context = contextlib.nullcontext() if recorder.grad else torch.no_grad()
    with context, model.hooks(fwd_hooks=hooks):
        if stop_at_layer is not None:
            return model(tokens, stop_at_layer=stop_at_layer)
        logits = model(tokens, return_type="logits")
    return logits
