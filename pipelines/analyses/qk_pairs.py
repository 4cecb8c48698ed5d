"""QK feature pairs: an attention score split into (query component, key component) terms.

With the norm scales at both positions frozen, the query of head h at s is an
affine function of the residual ``x_s``; rotary embeddings rotate it by a
position-dependent linear map, so each component's projection is rotated on
its own. Substituting a residual-stream SAE decomposition on both sides,
``x = Σ_j a_j d_j + error + b_dec``, gives

    score = q_s·k_t / attn_scale = Σ_{i∈Q} Σ_{j∈K} (R_s q_i)·(R_t k_j) / attn_scale

where Q and K are the active features, the error, b_dec and the projection's
own bias (norm bias·W + b). The table sums exactly to the score.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses.linear_parts import (
    AnalysisInputError,
    as_plain_sae,
    check_plain_sae,
    norm_bias,
    norm_linear,
    sae_encode_flat,
)
from circuitscan.pipelines.sae_splice import require_detached, sae_hook_name
from circuitscan.schemas.analyses import QKPairTable, QKVarianceExplained
from circuitscan.schemas.hooks import HookSite, block_hook


def _resid_layer(sae: SAE) -> int:
    site = HookSite.from_hook_name(sae_hook_name(sae))
    if site.point == "resid_pre":
        return site.layer
    if site.point == "resid_post":
        return site.layer + 1
    raise AnalysisInputError(f"QK pairs need a residual-stream SAE, got one at {site.label}")


def _rotate(attn, vecs: Float[torch.Tensor, "n d_head"], pos: int) -> torch.Tensor:
    """TransformerLens's rotary map at one position, applied to each row."""
    if attn.cfg.positional_embedding_type != "rotary":
        return vecs
    rd = attn.cfg.rotary_dim
    x_rot, x_pass = vecs[..., :rd], vecs[..., rd:]
    cos = attn.rotary_cos[pos].to(vecs.dtype)
    sin = attn.rotary_sin[pos].to(vecs.dtype)
    return torch.cat([x_rot * cos + attn.rotate_every_two(x_rot) * sin, x_pass], dim=-1)


def _components(
    sae: SAE, x: Float[torch.Tensor, " d_model"]
) -> tuple[list[str], Float[torch.Tensor, "n d_model"]]:
    acts = sae_encode_flat(sae, x.unsqueeze(0))[0].to(x.dtype)
    w_dec = sae.W_dec.to(x.dtype)
    b_dec = sae.b_dec.to(x.dtype)
    active = torch.nonzero(acts).flatten()
    feats = acts[active, None] * w_dec[active]
    error = x - acts @ w_dec - b_dec
    labels = [f"f{int(j)}" for j in active] + ["error", "b_dec"]
    return labels, torch.cat([feats, error[None], b_dec[None]], dim=0)


def _check(model: HookedSAETransformer, saes: tuple[SAE, SAE], layer: int, head: int) -> None:
    # The scores are decomposed on the model's own forward pass, without SAEs in it.
    require_detached(model, "qk_feature_pairs", AnalysisInputError)
    cfg = model.cfg
    if cfg.attn_scores_soft_cap not in (None, -1.0) or cfg.use_qk_norm or cfg.use_logn_attn:
        raise AnalysisInputError(
            "attention variants with soft-cap, QK-norm or logn are unsupported"
        )
    if cfg.positional_embedding_type not in ("standard", "rotary", "shortformer"):
        raise AnalysisInputError(f"positional embedding {cfg.positional_embedding_type!r}")
    for s in saes:
        check_plain_sae(s)
        if _resid_layer(s) != layer:
            raise AnalysisInputError(
                f"SAE at {sae_hook_name(s)} does not read the input of layer {layer}"
            )
    if not 0 <= head < cfg.n_heads:
        raise AnalysisInputError(f"head {head} out of range for {cfg.n_heads} heads")


@torch.no_grad()
def qk_feature_pairs(
    model: HookedSAETransformer,
    sae: SAE,
    tokens: Int[torch.Tensor, " seq"],
    layer: int,
    head: int,
    dest_pos: int,
    src_pos: int,
    *,
    key_sae: SAE | None = None,
) -> QKPairTable:
    """The attention score (pre-softmax logits units) of ``head`` from dest to src, by pairs.

    ``sae`` (and ``key_sae`` for the key side, default the same) must be a
    residual-stream SAE at the input of ``layer`` (resid_pre L or resid_post L−1).
    """
    if tokens.dim() != 1:
        raise AnalysisInputError(f"qk_feature_pairs takes one prompt (1-D), got {tokens.shape}")
    (table,) = qk_feature_pairs_batch(
        model, sae, tokens[None], torch.tensor([tokens.shape[0]]), layer, head,
        [dest_pos], [src_pos], key_sae=key_sae,
    )  # fmt: skip
    return table


@torch.no_grad()
def qk_feature_pairs_batch(
    model: HookedSAETransformer,
    sae: SAE,
    tokens: Int[torch.Tensor, "batch seq"],
    lengths: Int[torch.Tensor, " batch"],
    layer: int,
    head: int,
    dest_positions: list[int],
    src_positions: list[int],
    *,
    key_sae: SAE | None = None,
) -> list[QKPairTable]:
    """``qk_feature_pairs`` for each prompt of a right-padded batch, from one forward pass."""
    sae = as_plain_sae(sae)
    key_sae = sae if key_sae is None else as_plain_sae(key_sae)
    _check(model, (sae, key_sae), layer, head)
    if tokens.dim() != 2 or not len(dest_positions) == len(src_positions) == tokens.shape[0]:
        raise AnalysisInputError("need a [batch, seq] token batch and one dest/src per prompt")
    for n, dest_pos, src_pos in zip(lengths.tolist(), dest_positions, src_positions, strict=True):
        if not 0 <= src_pos <= dest_pos < n:
            raise AnalysisInputError(
                f"need 0 ≤ src_pos ≤ dest_pos < {n}, got src {src_pos}, dest {dest_pos}"
            )
    block = model.blocks[layer]
    names = [block_hook(layer, "resid_pre"), block_hook(layer, "ln1_scale")]
    # Right padding is harmless: positions only attend backwards, and only real ones are read.
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n in names, stop_at_layer=layer + 1
    )
    attn = block.attn
    tables = []
    for b, (dest_pos, src_pos) in enumerate(zip(dest_positions, src_positions, strict=True)):
        resid = cache[names[0]][b]
        scale = cache[names[1]][b] if names[1] in cache else torch.ones(resid.shape[0], 1)

        def side(s: SAE, pos: int, w: torch.Tensor, bias_w: torch.Tensor, resid=resid, scale=scale):
            labels, comps = _components(s, resid[pos])
            proj = norm_linear(block.ln1, comps, scale[pos]) @ w
            bias = norm_bias(block.ln1, resid[pos]) @ w + bias_w
            return [*labels, "bias"], _rotate(attn, torch.cat([proj, bias[None]]), pos)

        q_labels, q = side(sae, dest_pos, attn.W_Q[head], attn.b_Q[head])
        k_labels, k = side(key_sae, src_pos, attn.W_K[head], attn.b_K[head])
        table = q @ k.T / attn.attn_scale
        tables.append(
            QKPairTable(
                layer=layer,
                head=head,
                dest_pos=dest_pos,
                src_pos=src_pos,
                score=float(table.sum()),
                query_labels=q_labels,
                key_labels=k_labels,
                table=table.tolist(),
            )
        )
    return tables


def qk_pair_variance(tables: list[QKPairTable], top_n: int = 10) -> QKVarianceExplained:
    """Fraction of the score variance over prompts explained by the top-n feature pairs.

    Pairs are keyed by their labels; a pair absent from a prompt contributes 0
    there. Since the score is the sum of its pairs, ``Var(s) = Σ_p Cov(c_p, s)``:
    each pair's share ``Cov(c_p, s)/Var(s)`` (shares sum to 1) ranks the pairs,
    largest first. A pair that is large on average but constant across prompts
    explains no variance, so mean size is not the ranking.
    """
    if len(tables) < 2:
        raise AnalysisInputError("variance explained needs at least two prompts")
    if top_n < 1:
        raise AnalysisInputError(f"top_n must be at least 1, got {top_n}")
    heads = {(t.layer, t.head) for t in tables}
    if len(heads) != 1:
        raise AnalysisInputError(f"tables mix heads {sorted(heads)}")
    per_prompt: list[dict[tuple[str, str], float]] = []
    for t in tables:
        per_prompt.append(
            {
                (ql, kl): t.table[i][j]
                for i, ql in enumerate(t.query_labels)
                for j, kl in enumerate(t.key_labels)
            }
        )
    keys = sorted({k for d in per_prompt for k in d})
    values = torch.tensor([[d.get(k, 0.0) for k in keys] for d in per_prompt], dtype=torch.float64)
    scores = torch.tensor([t.score for t in tables], dtype=torch.float64)
    var = float(scores.var())
    centred = values - values.mean(0)
    shares = (centred * (scores - scores.mean())[:, None]).sum(0) / (len(tables) - 1)
    shares = shares / var if var > 0 else torch.zeros_like(shares)
    order = shares.argsort(descending=True)[:top_n]
    fractions = []
    for n in range(1, len(order) + 1):
        residual = scores - values[:, order[:n]].sum(1)
        fractions.append(1.0 - float(residual.var()) / var if var > 0 else float("nan"))
    layer, head = heads.pop()
    return QKVarianceExplained(
        layer=layer,
        head=head,
        n_prompts=len(tables),
        top_pairs=[(keys[i][0], keys[i][1], float(values[:, i].mean())) for i in order.tolist()],
        variance_share=[float(shares[i]) for i in order.tolist()],
        fraction_explained=fractions,
    )
