"""The one place where circuitscan puts SAEs into a model's forward pass.

Two forms, one rule.

- **The transparent splice** (:func:`transparent_splice`), written as a plain
  TransformerLens hook at the SAE's own site. Caching, AtP/AtP*, exact
  patching and ablation scans all splice this way. At every site

      out = x + (decode(a) − decode(a₀)) + (e − e₀),  a₀ = encode(x),  e₀ = x − decode(a₀)

  which is ``x`` exactly while nothing is edited (the model's output is
  unchanged), passes ∂m/∂x through as the identity (upstream sites see the
  true model: sae_lens computes its error term under ``no_grad``, which would
  cut that path), and gives the feature activations ``a`` and the error ``e``
  their own exact gradients.
- **sae_lens's own attachment for a block** (:func:`spliced`), with or without
  the error term: for looking at a spliced model, e.g. measuring how faithful
  an SAE is. On exit the model has exactly the SAEs it had before: only the
  ones attached here are removed, and an SAE the caller had at the same hook
  (``replace=True``) is put back with its own error-term setting.

The rule: a pipeline never detaches an SAE it did not attach. The pipelines
that run the model with hooks of their own (all of them) need the model as it
is without SAEs (an attached SAE without its error term changes the
activations; with it, the gradients; and it renames the hooks they read), so
they refuse a model with SAEs attached (:func:`require_detached`) rather than
take the caller's SAEs off. SAEs are passed as a sequence, each SAE's site read
from its own config (``sae.cfg.metadata.hook_name``); :func:`saes_by_hook` is
the one place an older mapping form is turned into that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE, HookedSAETransformer

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookSite

SaeEdit = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SaeArg = Sequence[SAE[Any]] | Mapping[HookSite | str, SAE[Any]]


class SpliceError(UserInputError):
    """SAEs that cannot be spliced into this model as asked."""


def sae_hook_name(sae: SAE[Any]) -> str:
    """The TransformerLens hook an SAE reads (and writes back to)."""
    name = sae.cfg.metadata.hook_name
    if not name:
        raise SpliceError("SAE has no hook_name in its metadata; cannot tell where it belongs")
    return str(name)


def saes_by_hook(saes: SaeArg | None) -> dict[str, SAE[Any]]:
    """SAEs keyed by the hook each reads, from a sequence (or the older mapping form).

    A mapping may be keyed by HookSite, site label (``L1.z``) or hook name; a
    key must agree with the SAE's own config where that names a hook.
    """
    if saes is None:
        return {}
    if isinstance(saes, Mapping):
        out: dict[str, SAE[Any]] = {}
        for key, sae in saes.items():
            own = sae.cfg.metadata.hook_name
            if isinstance(key, HookSite):
                hook = key.hook_name
            else:
                hook = key if key == own else HookSite.parse(key).hook_name
            if own and own != hook:
                raise SpliceError(f"the SAE given for {key} reads {own}, not {hook}")
            out[hook] = sae
        return out
    hooks = [sae_hook_name(sae) for sae in saes]
    duplicates = sorted({hook for hook in hooks if hooks.count(hook) > 1})
    if duplicates:
        raise SpliceError(f"more than one SAE for hook(s) {duplicates}")
    return dict(zip(hooks, saes, strict=True))


def require_detached(
    model: HookedSAETransformer, before: str, error: type[ValueError] = SpliceError
) -> None:
    """Refuse a model with SAEs attached; the caller's SAEs are theirs to detach."""
    attached = sorted(getattr(model, "acts_to_saes", None) or {})
    if attached:
        raise error(
            f"detach SAEs from the model (reset_saes) before {before}: SAEs are attached at "
            f"{attached}. Pass them to {before} instead, which splices them itself"
        )


def check_hooks(
    model: HookedSAETransformer, hooks: Sequence[str], error: type[ValueError] = SpliceError
) -> None:
    """Every hook is one of this model's."""
    for hook in hooks:
        if hook not in model.hook_dict:
            raise error(f"model has no hook {hook!r}")


def check_spliceable(
    model: HookedSAETransformer, saes: Sequence[SAE[Any]], *, replace: bool = False
) -> list[str]:
    """Hook names of ``saes``, after checking each exists, is used once, and is free.

    With ``replace`` a hook may hold an SAE already (it is swapped for the block).
    """
    hooks = list(saes_by_hook(saes))
    attached = getattr(model, "acts_to_saes", None) or {}
    for hook in hooks:
        if hook in attached:
            if not replace:
                raise SpliceError(f"an SAE is already spliced at {hook}; reset it first")
        elif hook not in model.hook_dict:
            raise SpliceError(f"model has no hook {hook!r}")
    return hooks


@contextlib.contextmanager
def spliced(
    model: HookedSAETransformer,
    saes: Sequence[SAE[Any]],
    *,
    use_error_term: bool = True,
    replace: bool = False,
) -> Iterator[HookedSAETransformer]:
    """Attach ``saes`` for the ``with`` block; on exit, even on error, the model is as before.

    SAEs the caller has at other hooks stay in place. A hook that already
    holds one is refused unless ``replace``: then the caller's SAE is swapped
    out for the block and put back on exit with its own error-term setting.
    """
    check_spliceable(model, saes, replace=replace)
    # sae_lens's own context manager records each hook's previous SAE and
    # restores exactly those hooks (reset_saes() with no names would remove all).
    with model.saes(saes=list(saes), use_error_term=use_error_term):
        yield model


def sae_encode(sae: SAE[Any], x: torch.Tensor) -> Float[torch.Tensor, "batch pos d_sae"]:
    """Feature activations of ``x`` (hook_z inputs may be [batch, pos, head, d_head])."""
    if x.ndim == 4 and not getattr(sae, "hook_z_reshaping_mode", False):
        x = x.flatten(-2)
    return sae.encode(x.to(sae.dtype))


def sae_decode(sae: SAE[Any], acts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reconstruction in the shape and dtype of the site activation ``like``."""
    out = sae.decode(acts)
    return out.reshape(like.shape).to(like.dtype)


def sae_reconstruct(sae: SAE[Any], x: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of an activation given in its hook's shape and dtype."""
    return sae_decode(sae, sae_encode(sae, x), x)


def transparent_splice(
    sae: SAE[Any], x: torch.Tensor, *, grad: bool = False, edit: SaeEdit | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what the site passes on, feature activations, error term) of ``sae`` at activation ``x``.

    With ``grad`` the activations and the error are fresh leaves that require
    gradients; ``edit(acts, err) -> (acts, err)`` changes them before they are
    put back. The activations and error returned are those before the edit.
    """
    with torch.no_grad():
        acts0 = sae_encode(sae, x)
        recon0 = sae_decode(sae, acts0, x)
        err0 = x - recon0
    acts, err = acts0, err0
    if grad:
        acts = acts0.clone().requires_grad_(True)
        err = err0.clone().requires_grad_(True)
    if edit is None and not grad:
        return x, acts, err
    new_acts, new_err = edit(acts, err) if edit is not None else (acts, err)
    out = x + (sae_decode(sae, new_acts, x) - recon0) + (new_err - err0)
    return out, acts, err
