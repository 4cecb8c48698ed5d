"""The linear pieces the analyses share: frozen norms, per-query-head weights, SAE encodings.

With a normalisation's scale frozen (taken from a forward pass), LayerNorm and
RMSNorm are affine maps of their input: ``norm(x) = P(x)/σ ⊙ w + b`` with ``P``
the centring for LayerNorm and the identity for RMSNorm. Every decomposition
in this package rests on that, so it is spelled here once.
"""

from __future__ import annotations

import copy

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import nn
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

from circuitscan.schemas.errors import UserInputError


class AnalysisInputError(UserInputError):
    """An analysis was asked for something the model, SAEs or positions do not allow."""


def _centres(norm: nn.Module) -> bool:
    if isinstance(norm, (LayerNorm, LayerNormPre)):
        return True
    if isinstance(norm, (RMSNorm, RMSNormPre)):
        return False
    raise AnalysisInputError(f"unsupported normalisation module {type(norm).__name__}")


def norm_weight(norm: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The elementwise gain ``w`` of a norm (ones for the *Pre variants)."""
    w = getattr(norm, "w", None)
    return torch.ones(like.shape[-1], dtype=like.dtype) if w is None else w.to(like.dtype)


def norm_bias(norm: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The additive bias ``b`` of a norm (zeros for RMSNorm and the *Pre variants)."""
    b = getattr(norm, "b", None)
    return torch.zeros(like.shape[-1], dtype=like.dtype) if b is None else b.to(like.dtype)


def norm_linear(
    norm: nn.Module, x: Float[torch.Tensor, "... d_model"], scale: Float[torch.Tensor, "... 1"]
) -> Float[torch.Tensor, "... d_model"]:
    """The linear part of ``norm(x)`` with its scale frozen: ``P(x)/σ ⊙ w`` (no bias)."""
    if norm is None or isinstance(norm, nn.Identity):
        return x
    if _centres(norm):
        x = x - x.mean(-1, keepdim=True)
    return x / scale * norm_weight(norm, x)


def norm_readout(
    norm: nn.Module, readout: Float[torch.Tensor, "... d_model"], scale: Float[torch.Tensor, "..."]
) -> Float[torch.Tensor, "... d_model"]:
    """The vector ``r'`` with ``r'·x = r·norm_linear(x)`` (the adjoint; P is symmetric)."""
    if norm is None or isinstance(norm, nn.Identity):
        return readout
    r = readout * norm_weight(norm, readout) / scale.unsqueeze(-1)
    if _centres(norm):
        r = r - r.mean(-1, keepdim=True)
    return r


def check_plain_sae(sae: SAE) -> None:
    """Reject SAEs whose encoder is not ``(x − b_dec)·W_enc + b_enc`` on the raw activation."""
    if getattr(sae.cfg, "normalize_activations", "none") not in (None, "none"):
        raise AnalysisInputError(
            f"SAE normalize_activations={sae.cfg.normalize_activations!r} is not supported by the "
            "linear analyses; fold the normalisation into the weights first"
        )
    if not hasattr(sae, "W_enc") or not hasattr(sae, "b_enc"):
        raise AnalysisInputError(f"SAE {type(sae).__name__} has no linear W_enc/b_enc encoder")


def as_plain_sae(sae: SAE) -> SAE:
    """The SAE with decoder-norm rescaling folded into its weights (a copy), else itself.

    sae_lens TopK SAEs with ``rescale_acts_by_decoder_norm`` multiply the
    encoder output by ``‖W_dec‖`` and divide it out again in the decoder.
    Folding that into ``W_enc``, ``b_enc`` and ``W_dec`` gives the same
    activations and reconstructions, and makes every analysis's identities
    (activation = pre-activation for an active feature, contribution =
    activation · decoder row) hold on the weights as stored.
    """
    if not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return sae
    plain = copy.deepcopy(sae)
    with torch.no_grad():
        norms = plain.W_dec.norm(dim=-1).clamp(min=1e-8)
        plain.W_dec.div_(norms[:, None])
        plain.W_enc.mul_(norms[None, :])
        plain.b_enc.mul_(norms)
    plain.cfg.rescale_acts_by_decoder_norm = False
    return plain


def sae_encode_flat(
    sae: SAE, x_flat: Float[torch.Tensor, "... d_in"], d_head: int | None = None
) -> Float[torch.Tensor, "... d_sae"]:
    """Feature activations for a flattened input (hook_z SAEs that reshape need ``d_head``)."""
    if getattr(sae, "hook_z_reshaping_mode", False):
        if d_head is None:
            raise AnalysisInputError("a hook_z SAE needs d_head to encode a flattened input")
        return sae.encode(x_flat.unflatten(-1, (-1, d_head)))
    return sae.encode(x_flat)


def sae_pre_flat(sae: SAE, x_flat: Float[torch.Tensor, "... d_in"]) -> torch.Tensor:
    """Encoder pre-activations ``(x − b_dec·apply)·W_enc + b_enc`` on a flattened input."""
    b = sae.b_dec * float(sae.cfg.apply_b_dec_to_input)
    return (x_flat.to(sae.W_enc.dtype) - b) @ sae.W_enc + sae.b_enc


def sae_encoder_bias(sae: SAE, feature: int) -> float:
    """The input-independent part of a feature's pre-activation."""
    apply = float(sae.cfg.apply_b_dec_to_input)
    return float((sae.b_enc[feature] - apply * (sae.b_dec @ sae.W_enc[:, feature])).detach())
