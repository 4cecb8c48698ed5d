"""Splice SAEs into a model for the duration of a block, and always take them out.

With the error term kept (the default) the model's output is unchanged, up to
float rounding, and every SAE feature sits on the computation path so it gets
an exact gradient. Without it, each hook's activation is replaced by the SAE
reconstruction: that is how an SAE's faithfulness is measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from sae_lens import SAE, HookedSAETransformer


class SpliceError(ValueError):
    """SAEs that cannot be spliced into this model as asked."""


def sae_hook_name(sae: SAE[Any]) -> str:
    """The TransformerLens hook an SAE reads (and writes back to)."""
    name = sae.cfg.metadata.hook_name
    if not name:
        raise SpliceError("SAE has no hook_name in its metadata; cannot tell where it belongs")
    return str(name)


def check_spliceable(model: HookedSAETransformer, saes: Sequence[SAE[Any]]) -> list[str]:
    """Hook names of ``saes``, after checking each exists, is free, and is used once."""
    hooks = [sae_hook_name(sae) for sae in saes]
    for hook in hooks:
        if hook in model.acts_to_saes:
            raise SpliceError(f"an SAE is already spliced at {hook}; reset it first")
        if hook not in model.hook_dict:
            raise SpliceError(f"model has no hook {hook!r}")
    duplicates = sorted({hook for hook in hooks if hooks.count(hook) > 1})
    if duplicates:
        raise SpliceError(f"more than one SAE for hook(s) {duplicates}")
    return hooks


@contextlib.contextmanager
def spliced(
    model: HookedSAETransformer, saes: Sequence[SAE[Any]], *, use_error_term: bool = True
) -> Iterator[HookedSAETransformer]:
    """Attach ``saes`` for the ``with`` block; they are removed on exit, even on error.

    SAEs already spliced elsewhere on the model are left in place.
    """
    hooks = check_spliceable(model, saes)
    attached: list[str] = []
    try:
        for hook, sae in zip(hooks, saes, strict=True):
            model.add_sae(sae, use_error_term=use_error_term)
            attached.append(hook)
        yield model
    finally:
        if attached:
            model.reset_saes(attached)
