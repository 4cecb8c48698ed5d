"""AtP* QK fix: exact softmax rows for query and key nodes, linearised after the softmax.

Plain AtP linearises through the softmax, which saturates, so it misses
queries and keys. Here a query node (head h, position s) gets its row of
attention scores recomputed with the corrupted query, the row's softmax taken
exactly, and only the map pattern → metric linearised:
``Σ_t (A'_{s,t} − A_{s,t}) ∂m/∂A_{s,t}``. A key node (KV head g, position t)
changes column t of every row s ≥ t of every query head sharing g; each such
row's softmax is recomputed exactly in closed form (one entry changed:
``log Z' = logaddexp(log(Z − e^{S_t}), S'_t)``, the other entries scale by
``Z/Z'``), which is the full row recomputation without materialising a row
per (s, t).

Scores are computed from the *rotated* queries/keys when the model uses
rotary embeddings: rotation depends on position only, so patching ``hook_q``
at s with the corrupted value yields exactly the corrupted rotated query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from jaxtyping import Float

from circuitscan.schemas.hooks import HookSite


def qk_sites(cfg: object, layer: int) -> tuple[HookSite, HookSite]:
    """Where the queries/keys that enter the attention scores are read."""
    if getattr(cfg, "positional_embedding_type", "standard") == "rotary":
        return HookSite(layer=layer, point="rot_q"), HookSite(layer=layer, point="rot_k")
    return HookSite(layer=layer, point="q"), HookSite(layer=layer, point="k")


def _check(attn: torch.nn.Module) -> None:
    cfg = cast(Any, attn).cfg
    if getattr(cfg, "use_qk_norm", False) and cfg.positional_embedding_type != "rotary":
        raise NotImplementedError("QK fix with qk-norm needs the normalised q/k (rotary models)")


@dataclass
class QueryTerms:
    """What a query node's QK-fixed score needs besides ∂m/∂A: ``A' − A`` per row."""

    delta: Float[torch.Tensor, "batch head query key"]


@dataclass
class KeyTerms:
    """What a key node's QK-fixed score needs besides ∂m/∂A (see :func:`key_terms`)."""

    pattern: Float[torch.Tensor, "batch head query key"]
    others_scale: Float[torch.Tensor, "batch head query key"]  # Z/Z' − 1
    weight_delta: Float[torch.Tensor, "batch head query key"]  # A'_{s,t} − A_{s,t}
    is_top: torch.Tensor  # [batch, head, query, key] bool: each row's largest weight
    masked: torch.Tensor  # [batch, head, query, key] bool: entries masked out (−inf)
    n_kv: int


def query_terms(
    attn: torch.nn.Module,
    q: Float[torch.Tensor, "batch pos head d_head"],
    q_corrupt: Float[torch.Tensor, "batch pos head d_head"],
    k: Float[torch.Tensor, "batch pos kv_head d_head"],
    scores: Float[torch.Tensor, "batch head query key"],
    pattern: Float[torch.Tensor, "batch head query key"],
) -> QueryTerms:
    """Exact attention rows with each query replaced by its corrupted value (no gradient yet)."""
    _check(attn)
    calc = cast(Any, attn).calculate_attention_scores
    # Only the q·k term changes; masks and additive biases in ``scores`` stay.
    new_scores = scores + (calc(q_corrupt, k) - calc(q, k))
    new_pattern = torch.softmax(new_scores, dim=-1).nan_to_num(0.0)
    return QueryTerms(delta=new_pattern - pattern)


def query_effect(
    terms: QueryTerms, grad_pattern: Float[torch.Tensor, "batch head query key"]
) -> Float[torch.Tensor, "batch pos head"]:
    """QK-fixed effect (metric units) of patching each query head's query at each position."""
    return (terms.delta * grad_pattern).sum(-1).transpose(1, 2)


def _sum_of_others(
    values: Float[torch.Tensor, "batch head query key"],
    is_top: torch.Tensor,
) -> Float[torch.Tensor, "batch head query key"]:
    """Σ_{t'≠t} values_{s,t'} for every t, without cancellation at a row's dominant entry.

    Only a row's largest attention weight can exceed ½: for it, the others are
    summed directly; for every other entry, subtracting it from the row total
    loses nothing that matters.
    """
    total = values.sum(-1, keepdim=True)
    top_rest = values.masked_fill(is_top, 0.0).sum(-1, keepdim=True)
    return torch.where(is_top, top_rest, total - values)


def key_terms(
    attn: torch.nn.Module,
    q: Float[torch.Tensor, "batch pos head d_head"],
    k: Float[torch.Tensor, "batch pos kv_head d_head"],
    k_corrupt: Float[torch.Tensor, "batch pos kv_head d_head"],
    scores: Float[torch.Tensor, "batch head query key"],
    pattern: Float[torch.Tensor, "batch head query key"],
) -> KeyTerms:
    """Exact attention rows with each single key replaced, in closed form (no gradient yet)."""
    _check(attn)
    calc = cast(Any, attn).calculate_attention_scores
    # Entry (s, t) of calc(q, k_corrupt) is the score with only k_t replaced.
    new_entry = scores + (calc(q, k_corrupt) - calc(q, k))
    log_z = torch.logsumexp(scores, dim=-1, keepdim=True)
    is_top = torch.zeros_like(pattern, dtype=torch.bool).scatter_(
        -1, pattern.argmax(-1, keepdim=True), True
    )
    log_rest = log_z + torch.log(_sum_of_others(pattern, is_top).clamp(min=0.0))
    log_z_new = torch.logaddexp(log_rest, new_entry)
    return KeyTerms(
        pattern=pattern,
        others_scale=torch.exp(log_z - log_z_new) - 1,
        weight_delta=torch.exp(new_entry - log_z_new) - pattern,
        is_top=is_top,
        masked=torch.isinf(scores),
        n_kv=k.shape[2],
    )


def key_effect(
    terms: KeyTerms, grad_pattern: Float[torch.Tensor, "batch head query key"]
) -> Float[torch.Tensor, "batch pos kv_head"]:
    """QK-fixed effect (metric units) of patching each key/value head's key at each position."""
    others = _sum_of_others(terms.pattern * grad_pattern, terms.is_top)
    effect = terms.others_scale * others + terms.weight_delta * grad_pattern
    effect = effect.masked_fill(terms.masked, 0.0)
    per_head = effect.sum(-2)  # over query rows: [batch, head, key]
    batch, n_heads, n_keys = per_head.shape
    # repeat_interleave order: query head h reads KV head h // (n_heads / n_kv).
    per_kv = per_head.reshape(batch, terms.n_kv, n_heads // terms.n_kv, n_keys).sum(2)
    return per_kv.transpose(1, 2)


def fix_terms(
    side: Literal["query", "key"],
    attn: torch.nn.Module,
    q: Float[torch.Tensor, "batch pos head d_head"],
    k: Float[torch.Tensor, "batch pos kv_head d_head"],
    q_corrupt: Float[torch.Tensor, "batch pos head d_head"],
    k_corrupt: Float[torch.Tensor, "batch pos kv_head d_head"],
    scores: Float[torch.Tensor, "batch head query key"],
    pattern: Float[torch.Tensor, "batch head query key"],
) -> QueryTerms | KeyTerms:
    """The exact-row terms of a node kind's side of the score (its row's ``qk_fix``)."""
    if side == "query":
        return query_terms(attn, q, q_corrupt, k, scores, pattern)
    return key_terms(attn, q, k, k_corrupt, scores, pattern)


def fix_effect(
    terms: QueryTerms | KeyTerms, grad_pattern: Float[torch.Tensor, "batch head query key"]
) -> Float[torch.Tensor, "batch pos units"]:
    """QK-fixed effect per (position, head) of the terms :func:`fix_terms` computed."""
    if isinstance(terms, QueryTerms):
        return query_effect(terms, grad_pattern)
    return key_effect(terms, grad_pattern)
