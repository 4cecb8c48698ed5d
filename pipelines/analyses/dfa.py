"""Direct feature attribution (DFA) of attention-output SAE features, and its recursion.

With attention patterns and normalisation scales frozen from one forward pass,
a hook_z SAE feature's pre-activation at destination ``s`` is

    pre = Σ_h Σ_t A^h_{s,t} (v^h_t · W_enc[h, :, i]) + (b_enc[i] − b_dec·W_enc[:, i])

exactly. ``v^h_t = norm1(x_t) W_V^h + b_V^h`` is affine in the residual ``x_t``
at the head's input, so each (head, source) term is ``r·x_t + c``; the
residual is decomposed either by a residual-stream SAE at that site (features
+ error + b_dec) or into the outputs that built it (token and position
embeddings, earlier attention outputs — split by their hook_z SAE into
features + error + bias — and MLP outputs). Features found that way are
expanded again the same way, so the tree runs towards the tokens. Every
node's children sum exactly to its value: a feature's own decomposition is of
its pre-activation, scaled by its gain into the parent, which is exact for
ReLU-family SAEs where an active feature's activation equals its pre-activation
(features for which that does not hold are left as leaves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses.linear_parts import (
    AnalysisInputError,
    as_plain_sae,
    check_plain_sae,
    norm_bias,
    norm_readout,
    sae_encode_flat,
    sae_encoder_bias,
    sae_pre_flat,
)
from circuitscan.pipelines.sae_splice import require_detached, sae_hook_name
from circuitscan.schemas.analyses import DFANode, DFANodeKind, DFAResult
from circuitscan.schemas.hooks import EMBED_HOOK, POS_EMBED_HOOK, HookSite, block_hook


@dataclass(frozen=True)
class Pruning:
    """How far and how wide a recursive DFA goes.

    ``max_depth`` counts tree levels below the root; ``top_k`` children are kept
    per node (the rest merge into one 'other' leaf, so sums stay exact), and
    only children with ``|value| ≥ min_abs`` and ``≥ min_frac·|parent|`` are expanded.
    """

    max_depth: int = 4
    top_k: int = 8
    min_abs: float = 0.0
    min_frac: float = 0.02


class _Context:
    """One prompt's frozen forward pass plus the SAEs by site."""

    def __init__(
        self,
        model: HookedSAETransformer,
        saes: list[SAE],
        tokens: Int[torch.Tensor, " seq"],
        last_layer: int | None = None,
    ):
        if tokens.dim() != 1:
            raise AnalysisInputError(f"DFA takes one prompt's token ids (1-D), got {tokens.shape}")
        if model.cfg.attn_scores_soft_cap not in (None, -1.0) or model.cfg.use_qk_norm:
            raise AnalysisInputError("attention variants with soft-cap or QK-norm are unsupported")
        # The decomposition is of the model's own forward pass, without SAEs in it.
        require_detached(model, "DFA", AnalysisInputError)
        self.model = model
        self.cfg = model.cfg
        self.tokens = tokens
        self.z_saes: dict[int, SAE] = {}
        self.resid_saes: dict[int, tuple[SAE, str]] = {}
        for sae in map(as_plain_sae, saes):
            check_plain_sae(sae)
            site = HookSite.from_hook_name(sae_hook_name(sae))
            if site.point == "z":
                self.z_saes[site.layer] = sae
            elif site.point == "resid_pre":
                self.resid_saes[site.layer] = (sae, site.label)
            elif site.point == "resid_post":
                self.resid_saes[site.layer + 1] = (sae, site.label)
        with torch.no_grad():
            # Nothing above the analysed layer is read: stop the forward pass there.
            stop = None if last_layer is None else last_layer + 1
            _, cache = model.run_with_cache(tokens.unsqueeze(0), stop_at_layer=stop)
        self.cache = cache
        self.tok_str: list[str] | None = None
        if model.tokenizer is not None:
            self.tok_str = [model.tokenizer.decode([int(t)]) for t in tokens]

    def get(self, name: str) -> torch.Tensor:
        return self.cache[name][0]

    def values(self, layer: int) -> Float[torch.Tensor, "pos head d_head"]:
        v = self.get(block_hook(layer, "v"))
        reps = self.cfg.n_heads // v.shape[-2]
        return torch.repeat_interleave(v, reps, dim=-2) if reps > 1 else v

    def ln1_scale(self, layer: int) -> Float[torch.Tensor, " pos"]:
        name = block_hook(layer, "ln1_scale")
        if name not in self.cache:
            return torch.ones(self.tokens.shape[0], dtype=self.cfg.dtype)
        return self.get(name).reshape(self.tokens.shape[0])

    def tok(self, t: int) -> str:
        return repr(self.tok_str[t]) if self.tok_str else str(int(self.tokens[t]))


def _head_source_terms(
    ctx: _Context, layer: int, feature: int, dest: int
) -> tuple[Float[torch.Tensor, "head src"], float]:
    sae = ctx.z_saes[layer]
    d_head = ctx.cfg.d_head
    w_enc = sae.W_enc[:, feature].reshape(ctx.cfg.n_heads, d_head).to(ctx.cfg.dtype)
    pattern = ctx.get(block_hook(layer, "pattern"))[:, dest, :]  # head src
    v_dot = torch.einsum("thd,hd->ht", ctx.values(layer), w_enc)
    return pattern * v_dot, sae_encoder_bias(sae, feature)


@torch.no_grad()
def dfa(
    model: HookedSAETransformer,
    saes: list[SAE],
    tokens: Int[torch.Tensor, " seq"],
    feature: int,
    layer: int,
    dest_pos: int,
) -> DFAResult:
    """Split a hook_z SAE feature's pre-activation at ``dest_pos`` by head and source position.

    ``saes`` must contain the hook_z SAE of ``layer``; values are in the SAE's
    pre-activation units, and ``contributions`` plus ``bias`` sum to
    ``pre_activation`` exactly (patterns and norm scales frozen).
    """
    return dfa_features(model, saes, tokens, layer, dest_pos, features=[feature])[0]


@torch.no_grad()
def dfa_features(
    model: HookedSAETransformer,
    saes: list[SAE],
    tokens: Int[torch.Tensor, " seq"],
    layer: int,
    dest_pos: int,
    *,
    features: Sequence[int] | None = None,
    top: int = 4,
) -> list[DFAResult]:
    """:func:`dfa` of several features of the layer's hook_z SAE, sharing one forward pass.

    ``features``: the features to split; ``None``: the ``top`` features with the
    largest activation at ``dest_pos`` (active ones only, so possibly fewer).
    """
    ctx = _Context(model, saes, tokens, layer)
    if layer not in ctx.z_saes:
        raise AnalysisInputError(f"no hook_z SAE at layer {layer} among the given SAEs")
    _check_position(ctx, dest_pos)
    sae = ctx.z_saes[layer]
    z = ctx.get(block_hook(layer, "z"))[dest_pos].flatten()
    pre_all = sae_pre_flat(sae, z)
    act_all = sae_encode_flat(sae, z.unsqueeze(0), model.cfg.d_head)[0]
    if features is None:
        if top < 1:
            raise AnalysisInputError(f"top must be at least 1, got {top}")
        values, order = act_all.topk(min(top, act_all.shape[0]))
        chosen = [int(f) for f, v in zip(order.tolist(), values.tolist(), strict=True) if v > 0]
    else:
        chosen = [int(f) for f in features]
        bad = [f for f in chosen if not 0 <= f < act_all.shape[0]]
        if bad:
            raise AnalysisInputError(
                f"features {bad} out of range: the {HookSite(layer=layer, point='z').label} "
                f"SAE has {act_all.shape[0]}"
            )
    out = []
    for feature in chosen:
        terms, bias = _head_source_terms(ctx, layer, feature, dest_pos)
        out.append(
            DFAResult(
                site=HookSite(layer=layer, point="z").label,
                feature=feature,
                dest_pos=dest_pos,
                pre_activation=float(pre_all[feature]),
                activation=float(act_all[feature]),
                contributions=terms.tolist(),
                bias=bias,
                tokens=ctx.tok_str,
            )
        )
    return out


def _check_position(ctx: _Context, pos: int) -> None:
    if not 0 <= pos < ctx.tokens.shape[0]:
        raise AnalysisInputError(f"position {pos} is outside the prompt of {ctx.tokens.shape[0]}")


@dataclass(frozen=True)
class _Kid:
    """A child as a leaf, plus how to expand it into a subtree (None: always a leaf)."""

    leaf: DFANode
    expand: Callable[[int], DFANode] | None = None


def _leaf(kind: DFANodeKind, value: float, label: str, **meta: Any) -> DFANode:
    return DFANode(kind=kind, value=value, label=label, **meta)


def _active_is_pre(act: float, pre: float, dtype: torch.dtype) -> bool:
    # The scaled sub-decomposition is exact only when activation == pre-activation;
    # the tolerance only absorbs rounding between two evaluations of the same product.
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    return abs(act - pre) <= rel * max(1.0, abs(act))


class _Builder:
    def __init__(self, ctx: _Context, pruning: Pruning):
        self.ctx = ctx
        self.p = pruning

    def attn_feature(self, layer: int, feature: int, pos: int, gain: float, depth: int) -> DFANode:
        terms, bias = _head_source_terms(self.ctx, layer, feature, pos)
        value = gain * (float(terms.sum()) + bias)
        kids = [_Kid(_leaf("bias", gain * bias, "encoder bias"))]
        for h in range(terms.shape[0]):
            for t in range(pos + 1):
                leaf = _leaf(
                    "head_source", gain * float(terms[h, t]), f"L{layer}H{h} {pos}←{t}",
                    layer=layer, head=h, position=t,
                )  # fmt: skip
                kids.append(_Kid(leaf, partial(self.head_source, layer, h, feature, pos, t, gain)))
        return DFANode(
            kind="attn_feature", label=f"L{layer}.z#{feature}@{pos}", value=value, layer=layer,
            position=pos, feature=feature, site=HookSite(layer=layer, point="z").label,
            children=self.finish(kids, value, depth),
        )  # fmt: skip

    def head_source(
        self, layer: int, head: int, feature: int, dest: int, src: int, gain: float, depth: int
    ) -> DFANode:
        ctx = self.ctx
        attn = ctx.model.blocks[layer].attn
        sae = ctx.z_saes[layer]
        d_head = ctx.cfg.d_head
        e_h = sae.W_enc[head * d_head : (head + 1) * d_head, feature].to(ctx.cfg.dtype)
        a = float(ctx.get(block_hook(layer, "pattern"))[head, dest, src])
        u = gain * a * (attn.W_V[head] @ e_h)
        ln1 = ctx.model.blocks[layer].ln1
        const = float(norm_bias(ln1, u) @ u) + gain * a * float(attn.b_V[head] @ e_h)
        readout = norm_readout(ln1, u, ctx.ln1_scale(layer)[src])
        kids = self.resid_kids(layer, src, readout, const, allow_resid_sae=True)
        value = sum(k.leaf.value for k in kids)
        return DFANode(
            kind="head_source", label=f"L{layer}H{head} {dest}←{src}", value=value, layer=layer,
            head=head, position=src, children=self.finish(kids, value, depth),
        )  # fmt: skip

    def resid_feature(self, layer: int, feature: int, pos: int, gain: float, depth: int) -> DFANode:
        sae, site = self.ctx.resid_saes[layer]
        readout = gain * sae.W_enc[:, feature].to(self.ctx.cfg.dtype)
        const = gain * sae_encoder_bias(sae, feature)
        kids = self.resid_kids(layer, pos, readout, const, allow_resid_sae=False)
        value = sum(k.leaf.value for k in kids)
        return DFANode(
            kind="resid_feature", label=f"{site}#{feature}@{pos}", value=value, layer=layer,
            position=pos, feature=feature, site=site, children=self.finish(kids, value, depth),
        )  # fmt: skip

    def resid_kids(
        self, layer: int, pos: int, readout: torch.Tensor, const: float, *, allow_resid_sae: bool
    ) -> list[_Kid]:
        """Children of ``readout·x + const`` where x is the residual entering ``layer`` at pos."""
        ctx = self.ctx
        kids = [_Kid(_leaf("bias", const, "bias"))]
        if allow_resid_sae and layer in ctx.resid_saes:
            sae, site = ctx.resid_saes[layer]
            x = ctx.get(block_hook(layer, "resid_pre"))[pos]
            kids += self.sae_kids(
                sae, site, x, readout, "resid_feature", {"layer": layer, "position": pos},
                lambda j, g: partial(self.resid_feature, layer, j, pos, g),
            )  # fmt: skip
            return kids
        at = {"position": pos}
        kids.append(_Kid(_leaf("embed", float(ctx.get(EMBED_HOOK)[pos] @ readout),
                               f"embed {ctx.tok(pos)}@{pos}", **at)))  # fmt: skip
        if POS_EMBED_HOOK in ctx.cache:
            value = float(ctx.get(POS_EMBED_HOOK)[pos] @ readout)
            kids.append(_Kid(_leaf("pos_embed", value, f"pos_embed@{pos}", **at)))
        for k in range(layer):
            kids += self.attn_out_kids(k, pos, readout)
            mlp = block_hook(k, "mlp_out")
            if mlp in ctx.cache:
                value = float(ctx.get(mlp)[pos] @ readout)
                kids.append(_Kid(_leaf("mlp_out", value, f"L{k} mlp_out@{pos}", layer=k, **at)))
        return kids

    def sae_kids(
        self,
        sae: SAE,
        site: str,
        x: torch.Tensor,
        readout: torch.Tensor,
        kind: DFANodeKind,
        meta: dict[str, Any],
        expander: Callable[[int, float], Callable[[int], DFANode]],
    ) -> list[_Kid]:
        """``readout·x`` split into active features, error and b_dec of ``sae`` (x flat)."""
        acts = sae_encode_flat(sae, x.unsqueeze(0), self.ctx.cfg.d_head)[0].to(x.dtype)
        pre = sae_pre_flat(sae, x)
        w_dec = sae.W_dec.to(x.dtype)
        b_dec = sae.b_dec.to(x.dtype)
        error = x - acts @ w_dec - b_dec
        kids = [
            _Kid(_leaf("sae_error", float(error @ readout), f"{site} error", **meta)),
            _Kid(_leaf("sae_bias", float(b_dec @ readout), f"{site} b_dec", **meta)),
        ]
        for j in torch.nonzero(acts).flatten().tolist():
            g = float(w_dec[j] @ readout)
            act = float(acts[j])
            leaf = _leaf(
                kind, act * g, f"{site}#{j}@{meta['position']}", feature=j, site=site, **meta
            )
            kids.append(
                _Kid(leaf, expander(j, g) if _active_is_pre(act, float(pre[j]), x.dtype) else None)
            )
        return kids

    def attn_out_kids(self, k: int, pos: int, readout: torch.Tensor) -> list[_Kid]:
        ctx = self.ctx
        attn = ctx.model.blocks[k].attn
        through_o = attn.W_O.reshape(-1, ctx.cfg.d_model) @ readout
        b_o = float(attn.b_O @ readout)
        z_flat = ctx.get(block_hook(k, "z"))[pos].flatten()
        meta = {"layer": k, "position": pos}
        if k not in ctx.z_saes:
            value = float(z_flat @ through_o) + b_o
            return [_Kid(_leaf("attn_out", value, f"L{k} attn_out@{pos}", **meta))]
        site = HookSite(layer=k, point="z").label
        kids = [_Kid(_leaf("bias", b_o, f"L{k} b_O", **meta))]
        return kids + self.sae_kids(
            ctx.z_saes[k], site, z_flat, through_o, "attn_feature", meta,
            lambda j, g: partial(self.attn_feature, k, j, pos, g),
        )  # fmt: skip

    def finish(self, kids: list[_Kid], parent: float, depth: int) -> list[DFANode]:
        """Keep the top-k children (the rest become one 'other' leaf); expand the big ones."""
        if depth >= self.p.max_depth:
            return []
        order = sorted(kids, key=lambda k: -abs(k.leaf.value))
        kept, rest = order[: self.p.top_k], order[self.p.top_k :]
        out: list[DFANode] = []
        threshold = max(self.p.min_abs, self.p.min_frac * abs(parent))
        for kid in kept:
            big = abs(kid.leaf.value) >= threshold
            if kid.expand is not None and big and depth + 1 < self.p.max_depth:
                out.append(kid.expand(depth + 1))
            else:
                out.append(kid.leaf)
        if rest:
            value = sum(r.leaf.value for r in rest)
            out.append(_leaf("other", value, f"{len(rest)} others"))
        return out


@torch.no_grad()
def recursive_dfa(
    model: HookedSAETransformer,
    saes: list[SAE],
    tokens: Int[torch.Tensor, " seq"],
    feature: int,
    layer: int,
    dest_pos: int,
    pruning: Pruning | None = None,
) -> DFANode:
    """The DFA tree of a hook_z SAE feature at ``dest_pos``, down to ``pruning.max_depth``.

    The root's value is the feature's pre-activation (SAE units); every node's
    children sum exactly to it (see the module docstring). Residual-stream SAEs
    in ``saes`` (resid_pre L or resid_post L−1) decompose the input of layer L;
    hook_z SAEs decompose attention outputs and are recursed into.
    """
    ctx = _Context(model, saes, tokens, layer)
    if layer not in ctx.z_saes:
        raise AnalysisInputError(f"no hook_z SAE at layer {layer} among the given SAEs")
    _check_position(ctx, dest_pos)
    builder = _Builder(ctx, pruning or Pruning())
    return builder.attn_feature(layer, feature, dest_pos, 1.0, 0)


def check_tree_sums(node: DFANode, atol: float = 1e-9) -> float:
    """Largest |value − Σ children| over the tree (0 for an exact tree)."""
    if not node.children:
        return 0.0
    own = abs(node.value - sum(c.value for c in node.children))
    return max([own, *(check_tree_sums(c, atol) for c in node.children)])
