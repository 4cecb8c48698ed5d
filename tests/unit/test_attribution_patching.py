"""Exact patching and ablation scans against independent references, on tiny float64 models.

References: TransformerLens's own patching utilities (transformer_lens.patching)
for exact patching, and a naive loop of one full forward pass per ablation
for feature-ablation scans.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching

from circuitscan.pipelines.attribution import ablation_scan, exact_patch, run_atp
from circuitscan.pipelines.attribution.errors import AttributionInputError
from circuitscan.pipelines.metrics import metric_per_prompt
from circuitscan.pipelines.sae_splice import sae_decode, sae_encode
from circuitscan.schemas.attribution import Node, NodeSelection
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model, build_tiny_sae

METRIC = MetricSpec()


def _equal_length_pair(batch: int = 2, seq: int = 5, vocab: int = 40):
    generator = torch.Generator().manual_seed(3)
    clean = torch.randint(0, vocab, (batch, seq), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(0, vocab, (batch, 3), generator=generator)
    lengths = torch.full((batch,), seq)
    answer = torch.tensor([1, 2, 3, 4][:batch])
    wrong = torch.tensor([5, 6, 7, 8][:batch])
    return clean, corrupt, lengths, answer, wrong


# (node kind, TransformerLens patching function); GQA matters for the shared k/v heads.
TL_PATCHERS = [
    ("z", patching.get_act_patch_attn_head_out_by_pos),
    ("q", patching.get_act_patch_attn_head_q_by_pos),
    ("k", patching.get_act_patch_attn_head_k_by_pos),
    ("v", patching.get_act_patch_attn_head_v_by_pos),
]


@pytest.mark.parametrize(
    "kind,tl_patch,gqa",
    [(kind, tl_patch, False) for kind, tl_patch in TL_PATCHERS]
    + [(kind, tl_patch, True) for kind, tl_patch in TL_PATCHERS if kind in ("k", "v")],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_exact_patch_matches_transformer_lens_patching(kind, tl_patch, gqa):
    """Every (layer, position, head) z/q/k/v node: our Δm = TransformerLens's patching Δm.

    TransformerLens patches *into* the run it is given from a cache, so it runs
    our clean prompts with the corrupted prompts' activations: the same
    intervention as ``exact_patch(mode='corrupt')``. Its metric is the batch
    mean, so ours is averaged over the (equal-length) prompts.
    """
    kwargs = {"n_key_value_heads": 2, "positional": "rotary"} if gqa else {}
    model = build_tiny_model(normalization="RMS" if gqa else "LN", **kwargs)
    clean, corrupt, lengths, answer, wrong = _equal_length_pair()
    _, corrupt_cache = model.run_with_cache(corrupt)
    with torch.no_grad():
        base = metric_per_prompt(
            model(clean), METRIC, lengths=lengths, answer=answer, wrong=wrong
        ).mean()

    def metric(logits: torch.Tensor) -> torch.Tensor:
        per = metric_per_prompt(logits, METRIC, lengths=lengths, answer=answer, wrong=wrong)
        return per.mean() - base

    reference = tl_patch(model, clean, corrupt_cache, metric)  # [layer, pos, head]
    n_layers, seq, n_units = reference.shape
    nodes = [
        Node(kind=kind, layer=layer, index=unit, position=pos)
        for layer in range(n_layers)
        for pos in range(seq)
        for unit in range(n_units)
    ]
    ours = exact_patch(
        model, None, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt
    )
    ours = ours.mean(0).reshape(n_layers, seq, n_units)
    assert float(ours.abs().max()) > 1e-2  # the patches do something
    # TransformerLens stores its results in float32.
    torch.testing.assert_close(ours, reference.to(ours.dtype), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,tl_patch", TL_PATCHERS, ids=lambda v: v if isinstance(v, str) else None
)
def test_frozen_later_patterns_match_transformer_lens_patching_with_frozen_patterns(kind, tl_patch):
    """freeze_later_patterns: Δm equals TransformerLens's patching with every later block's
    attention pattern pinned to its clean value by a permanent hook, node by node.

    The prompts are shorter than the padded sequence, so our suffix passes cut
    their rows at the last position the metric reads while TransformerLens
    runs them whole.
    """
    model = build_tiny_model(n_layers=3, normalization="LN")
    clean, corrupt, _, answer, wrong = _equal_length_pair()
    lengths = torch.tensor([4, 3])
    _, clean_cache = model.run_with_cache(clean)
    _, corrupt_cache = model.run_with_cache(corrupt)
    with torch.no_grad():
        base = metric_per_prompt(model(clean), METRIC, lengths=lengths, answer=answer, wrong=wrong)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        per = metric_per_prompt(logits, METRIC, lengths=lengths, answer=answer, wrong=wrong)
        return (per - base).sum()

    n_layers = model.cfg.n_layers
    reference = []
    for layer in range(n_layers):
        for later in range(layer + 1, n_layers):
            model.add_hook(
                f"blocks.{later}.attn.hook_pattern",
                lambda x, hook: clean_cache[hook.name],
                is_permanent=True,
            )
        try:
            reference.append(tl_patch(model, clean, corrupt_cache, metric)[layer])
        finally:
            model.reset_hooks(including_permanent=True)
    # Positions past every prompt's end are not nodes; past one prompt's end, NaN (no effect).
    seq, n_units = int(lengths.max()), reference[0].shape[1]
    reference = [values[:seq] for values in reference]
    nodes = [
        Node(kind=kind, layer=layer, index=unit, position=pos)
        for layer in range(n_layers)
        for pos in range(seq)
        for unit in range(n_units)
    ]
    args = (model, None, clean, lengths, METRIC, answer, wrong, nodes)
    frozen = exact_patch(*args, corrupt_tokens=corrupt, freeze_later_patterns=True)
    free = exact_patch(*args, corrupt_tokens=corrupt)
    frozen, free = frozen.nan_to_num(0.0).sum(0), free.nan_to_num(0.0).sum(0)
    torch.testing.assert_close(
        frozen.reshape(n_layers, seq, n_units),
        torch.stack(reference).to(frozen.dtype),
        atol=1e-9,
        rtol=1e-7,
    )
    by_layer = (frozen - free).abs().reshape(n_layers, -1).amax(1)
    assert float(by_layer[-1]) == 0.0  # nothing comes after the last block
    assert float(by_layer[0]) > 1e-3  # later patterns do carry part of early nodes' effects


@pytest.mark.parametrize("mode", ["corrupt", "zero"])
def test_partial_patch_tends_to_the_atp_derivative(mode):
    """Δm/fraction as fraction → 0 is the directional derivative AtP multiplies out.

    Every z/q/k/v/neuron node of a float64 model with LayerNorm: at
    fraction 1e-6 the finite difference matches run_atp's estimate to
    1e-4 (relative), while at fraction 1 the two differ (the model is not
    linear), so the fraction really is applied.
    """
    model = build_tiny_model(normalization="LN")
    clean, corrupt, lengths, answer, wrong = _equal_length_pair()
    selection = NodeSelection(kinds=["z", "q", "k", "v", "neuron"], positions="all")
    result = run_atp(
        model, None, clean, corrupt if mode == "corrupt" else None, lengths, METRIC, answer,
        wrong, selection,
    )  # fmt: skip
    nodes = result.nodes()
    kwargs = {"mode": mode, "corrupt_tokens": corrupt if mode == "corrupt" else None}
    args = (model, None, clean, lengths, METRIC, answer, wrong, nodes)
    small = exact_patch(*args, **kwargs, fraction=1e-6) / 1e-6
    whole = exact_patch(*args, **kwargs)
    estimate = result.per_prompt()
    torch.testing.assert_close(small, estimate, rtol=1e-4, atol=1e-7)
    assert float((whole - estimate).abs().max()) > 1e-2


def test_partial_patch_is_linear_where_the_path_is():
    """Attention-only, no normalisation: the last layer's z nodes reach the logits linearly,
    so Δm(fraction) = fraction · Δm(1) exactly; layer 0's reach them through layer 1's
    attention patterns, so theirs is not."""
    model = build_tiny_model(normalization=None, attn_only=True)
    clean, corrupt, lengths, answer, wrong = _equal_length_pair()
    n_layers, n_heads, seq = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    nodes = [
        Node(kind="z", layer=layer, index=head, position=pos)
        for layer in range(n_layers)
        for pos in range(seq)
        for head in range(n_heads)
    ]
    args = (model, None, clean, lengths, METRIC, answer, wrong, nodes)
    whole = exact_patch(*args, corrupt_tokens=corrupt).reshape(2, n_layers, -1)
    part = exact_patch(*args, corrupt_tokens=corrupt, fraction=0.3).reshape(2, n_layers, -1)
    torch.testing.assert_close(part[:, -1], 0.3 * whole[:, -1], rtol=1e-9, atol=1e-12)
    assert float((part[:, 0] - 0.3 * whole[:, 0]).abs().max()) > 1e-3
    with pytest.raises(AttributionInputError, match="fraction must be in"):
        exact_patch(*args, corrupt_tokens=corrupt, fraction=0.0)


def test_exact_patch_mlp_matches_generic_activation_patch():
    """Whole-MLP nodes (mlp_post at a position) against generic_activation_patch."""
    model = build_tiny_model(normalization="LN")
    clean, corrupt, lengths, answer, wrong = _equal_length_pair()
    _, corrupt_cache = model.run_with_cache(corrupt)
    with torch.no_grad():
        base = metric_per_prompt(
            model(clean), METRIC, lengths=lengths, answer=answer, wrong=wrong
        ).mean()
    reference = patching.generic_activation_patch(
        model,
        clean,
        corrupt_cache,
        lambda logits: (
            metric_per_prompt(logits, METRIC, lengths=lengths, answer=answer, wrong=wrong).mean()
            - base
        ),
        patch_setter=patching.layer_pos_patch_setter,
        activation_name="post",
        index_axis_names=("layer", "pos"),
    )
    n_layers, seq = reference.shape
    nodes = [
        Node(kind="mlp", layer=layer, position=pos)
        for layer in range(n_layers)
        for pos in range(seq)
    ]
    ours = exact_patch(
        model, None, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt
    ).mean(0)
    assert float(ours.abs().max()) > 1e-2
    torch.testing.assert_close(
        ours.reshape(n_layers, seq), reference.to(ours.dtype), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("mode", ["corrupt", "zero", "mean"])
def test_skipping_unchanged_patches_changes_nothing(mode):
    """Rows skipped as no-ops (equal values, positions after the read) are truly 0."""
    model = build_tiny_model(normalization="RMS")
    site = HookSite(layer=1, point="resid_pre")
    saes = {site: build_tiny_sae(model, site, architecture="topk", k=4)}
    generator = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 40, (3, 7), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(0, 40, (3,), generator=generator)
    lengths = torch.tensor([7, 6, 5])
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    nodes = [
        node
        for pos in range(7)
        for node in (
            Node(kind="z", layer=0, index=1, position=pos),
            Node(kind="neuron", layer=1, index=3, position=pos),
            Node(kind="sae_error", layer=1, point="resid_pre", position=pos),
        )
    ]
    nodes += [
        Node(kind="feature", layer=1, point="resid_pre", index=f, position=p)
        for f in range(32)
        for p in (2, 3, "last")
    ]
    kwargs = {
        "corrupt_tokens": corrupt,
        "reference_tokens": corrupt,
        "reference_lengths": lengths,
        "mode": mode,
    }
    fast = exact_patch(model, saes, clean, lengths, METRIC, answer, wrong, nodes, **kwargs)
    slow = exact_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes, skip_unchanged=False, **kwargs
    )
    torch.testing.assert_close(fast, slow, atol=1e-9, rtol=0, equal_nan=True)
    assert int((fast == 0).sum()) > 0 and float(fast.nan_to_num(0).abs().max()) > 1e-3


def _naive_ablations(model, sae, site, tokens, lengths, answer, wrong, prompt, chosen, edits):
    """Δm of full forward passes on one prompt, row r setting feature f_r to v_r at ``chosen``.

    Rows are batched, but each is a complete forward pass with its own single
    ablation: the naive loop, without prefix caching or suffix tricks.
    """
    features = torch.tensor([f for f, _ in edits])
    values = torch.tensor([v for _, v in edits], dtype=torch.float64)
    rows = torch.arange(len(edits))[:, None]
    at = torch.tensor(chosen)[None, :]

    def hook(x, hook=None):
        acts = sae_encode(sae, x)
        edited = acts.clone()
        edited[rows, at, features[:, None]] = values[:, None].to(acts.dtype)
        return x + (sae_decode(sae, edited, x) - sae_decode(sae, acts, x))

    batch = tokens[prompt : prompt + 1].expand(len(edits), -1)
    with torch.no_grad():
        logits = model.run_with_hooks(batch, fwd_hooks=[(site.hook_name, hook)])
        clean = model(tokens[prompt : prompt + 1])

    def metric(x, n):
        return metric_per_prompt(
            x,
            METRIC,
            lengths=lengths[prompt].expand(n),
            answer=answer[prompt].expand(n),
            wrong=wrong[prompt].expand(n),
        )

    return (metric(logits, len(edits)) - metric(clean, 1)).tolist()


SCAN_SITES = [
    (HookSite(layer=1, point="resid_pre"), "standard"),
    (HookSite(layer=0, point="resid_post"), "topk"),
    (HookSite(layer=1, point="z"), "topk"),
    (HookSite(layer=0, point="mlp_post"), "standard"),
]


@pytest.mark.parametrize("site,architecture", SCAN_SITES, ids=lambda v: getattr(v, "label", v))
@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_ablation_scan_matches_naive_loop(site, architecture, mode):
    """Every (prompt, active feature) Δm equals a full forward pass with that one ablation."""
    model = build_tiny_model(normalization="LN")
    sae = build_tiny_sae(model, site, architecture=architecture, k=4)
    if architecture == "topk":  # decoder rows of unequal norm, divided out in decode
        sae.cfg.rescale_acts_by_decoder_norm = True
        with torch.no_grad():
            sae.W_dec.mul_(
                torch.linspace(0.5, 2.0, sae.W_dec.shape[0], dtype=sae.W_dec.dtype)[:, None]
            )
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 40, (3, 6), generator=generator)
    lengths = torch.tensor([6, 5, 4])
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    positions = "last" if mode == "resample" else "all"
    scan = ablation_scan(
        model, sae, site, tokens, lengths, METRIC, answer, wrong,
        mode=mode, positions=positions, batch_size=5,
    )  # fmt: skip
    assert scan.n_ablations > 5
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        acts = sae_encode(sae, cache[site.hook_name])  # [prompt, seq, d_sae]
    chosen = [
        [int(lengths[p]) - 1] if positions == "last" else list(range(int(lengths[p])))
        for p in range(3)
    ]
    slots = torch.stack([acts[p, c] for p in range(3) for c in chosen[p]])  # [slots, d_sae]
    checked = 0
    for p in range(3):
        expect: list[tuple[int, float, list[int]]] = []  # (column, got, candidate rows)
        edits: list[tuple[int, float]] = []
        for column, feature in enumerate(scan.features.tolist()):
            if not bool((acts[p, chosen[p], feature] > 0).any()):
                assert scan.delta[p, column] == 0 or torch.isnan(scan.delta[p, column])
                continue
            if mode == "zero":
                candidates = [0.0]
            elif mode == "mean":
                candidates = [float(slots[:, feature].mean())]
            else:  # the value must be the feature's activation at some chosen slot
                candidates = sorted(set(slots[:, feature].tolist()))
            rows = list(range(len(edits), len(edits) + len(candidates)))
            edits += [(feature, value) for value in candidates]
            expect.append((column, float(scan.delta[p, column]), rows))
        naive = _naive_ablations(
            model, sae, site, tokens, lengths, answer, wrong, p, chosen[p], edits
        )
        for column, got, rows in expect:
            closest = min(abs(got - naive[r]) for r in rows)
            assert closest < 1e-9, (p, int(scan.features[column]), got, [naive[r] for r in rows])
            checked += 1
    assert checked == scan.n_ablations
    assert float(scan.delta.nan_to_num(0).abs().max()) > 1e-3


def test_ablation_scan_mean_values_come_from_the_reference_set():
    """A separate reference set (a job's shared reference prompts) sets the mean value;
    passing the prompt set's own slots gives exactly the default result."""
    from circuitscan.pipelines.attribution.ablation_scan import reference_slots
    from circuitscan.pipelines.attribution.errors import AttributionInputError

    site = HookSite(layer=0, point="resid_post")
    model = build_tiny_model(normalization="LN")
    sae = build_tiny_sae(model, site, architecture="topk", k=4)
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 40, (3, 6), generator=generator)
    lengths = torch.tensor([6, 5, 4])
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    ref_tokens = torch.randint(0, 40, (4, 5), generator=generator)
    ref_lengths = torch.tensor([5, 5, 3, 4])
    common = dict(mode="mean", positions="all", batch_size=7)
    args = (model, sae, site, tokens, lengths, METRIC, answer, wrong)

    own = reference_slots(model, sae, site, tokens, lengths, "all")
    assert own.shape == (int(lengths.sum()), sae.cfg.d_sae)
    default = ablation_scan(*args, **common)
    same = ablation_scan(*args, **common, reference=own)
    assert torch.equal(default.delta.nan_to_num(7.0), same.delta.nan_to_num(7.0))

    slots = reference_slots(model, sae, site, ref_tokens, ref_lengths, "all")
    assert slots.shape[0] == int(ref_lengths.sum())
    scan = ablation_scan(*args, **common, reference=slots)
    means = slots.mean(0)
    assert not torch.allclose(means, own.mean(0))  # the two pools really differ
    for p in range(3):
        chosen = list(range(int(lengths[p])))
        columns = [
            c for c, f in enumerate(scan.features.tolist()) if not torch.isnan(scan.delta[p, c])
        ]
        edits = [(int(scan.features[c]), float(means[scan.features[c]])) for c in columns]
        naive = _naive_ablations(model, sae, site, tokens, lengths, answer, wrong, p, chosen, edits)
        for row, column in enumerate(columns):
            assert abs(float(scan.delta[p, column]) - naive[row]) < 1e-9

    with pytest.raises(AttributionInputError, match="reference slots have"):
        ablation_scan(*args, **common, reference=slots[:, :3])
    with pytest.raises(AttributionInputError, match="non-empty"):
        ablation_scan(*args, **common, reference=slots[:0])


SAE_SITES = [
    HookSite(layer=1, point="resid_pre"),
    HookSite(layer=0, point="resid_post"),
    HookSite(layer=1, point="resid_post"),
    HookSite(layer=0, point="mlp_post"),
    HookSite(layer=1, point="z"),
]


@pytest.mark.parametrize("site", SAE_SITES, ids=lambda s: s.label)
def test_exact_patch_sae_nodes_match_full_forward_patch(site):
    """Feature and error nodes at every kind of SAE site: one full forward pass per patch.

    The reference splices nothing but the one edit: at the node's position,
    the activation gains decode(a') − decode(a) (feature) or e' − e (error),
    with a and e from the clean run and a', e' from the corrupted run.
    """
    model = build_tiny_model(normalization="RMS")
    sae = build_tiny_sae(model, site, architecture="topk", k=4)
    clean, corrupt, lengths, answer, wrong = _equal_length_pair(batch=2, seq=5)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupt_cache = model.run_with_cache(corrupt)
        base = metric_per_prompt(model(clean), METRIC, lengths=lengths, answer=answer, wrong=wrong)
    acts = sae_encode(sae, clean_cache[site.hook_name])
    acts_corrupt = sae_encode(sae, corrupt_cache[site.hook_name])
    changed = torch.nonzero((acts != acts_corrupt).any(0).any(0)).flatten()[:6].tolist()
    nodes = [
        Node(kind="feature", layer=site.layer, point=site.point, index=f, position=p)
        for f in changed
        for p in (2, 4)
    ] + [Node(kind="sae_error", layer=site.layer, point=site.point, position=p) for p in (1, 3)]
    ours = exact_patch(
        model, {site: sae}, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt
    )
    reference = torch.zeros_like(ours)
    for n, node in enumerate(nodes):

        def hook(x, hook=None, node=node):
            a = sae_encode(sae, x)
            recon = sae_decode(sae, a, x)
            a_corrupt = sae_encode(sae, corrupt_cache[site.hook_name])
            x_corrupt = corrupt_cache[site.hook_name]
            error_corrupt = x_corrupt - sae_decode(sae, a_corrupt, x_corrupt)
            edited = a.clone()
            if node.kind == "feature":
                edited[:, node.position, node.index] = a_corrupt[:, node.position, node.index]
                return x + (sae_decode(sae, edited, x) - recon)
            out = x.clone()
            out[:, node.position] = recon[:, node.position] + error_corrupt[:, node.position]
            return out

        with torch.no_grad():
            logits = model.run_with_hooks(clean, fwd_hooks=[(site.hook_name, hook)])
        reference[:, n] = (
            metric_per_prompt(logits, METRIC, lengths=lengths, answer=answer, wrong=wrong) - base
        )
    assert float(reference.abs().max()) > 1e-3
    torch.testing.assert_close(ours, reference, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", ["corrupt", "mean"])
def test_single_prompt_patch_equals_its_row_of_a_batch(mode):
    """A batch of one is not mistaken for a reference mean (one row, position-independent)."""
    model = build_tiny_model(normalization="RMS")
    site = HookSite(layer=0, point="resid_post")
    saes = {site: build_tiny_sae(model, site, architecture="topk", k=4)}
    clean, corrupt, lengths, answer, wrong = _equal_length_pair(batch=2, seq=5)
    nodes = [Node(kind="z", layer=1, index=2, position=p) for p in range(1, 5)] + [
        Node(kind="feature", layer=0, point="resid_post", index=f, position=p)
        for f in range(32)
        for p in (2, 4)
    ]
    kwargs = {"mode": mode, "reference_tokens": corrupt, "reference_lengths": lengths}
    both = exact_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt, **kwargs
    )
    one = exact_patch(
        model, saes, clean[:1], lengths[:1], METRIC, answer[:1], wrong[:1], nodes,
        corrupt_tokens=corrupt[:1], **kwargs,
    )  # fmt: skip
    assert float(one.abs().max()) > 1e-3
    torch.testing.assert_close(one, both[:1], atol=1e-9, rtol=0)
