"""Second-order AtP (the HVP correction) by intervention on tiny float64 models.

References: exact patching (``exact_patch``) where the path from a node to the
metric is exactly quadratic (a model whose last MLP squares its input, with
that block's attention silenced and no norms), and, on an ordinary model,
the second-order coefficient of partial patches ``a + f·Δ`` read off
``exact_patch(fraction=f)`` by finite differences.
"""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.attribution import exact_patch, run_atp
from circuitscan.pipelines.attribution.certify import subset_patch
from circuitscan.schemas.attribution import AttributionMethod, NodeSelection
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model, build_tiny_sae

METRIC = MetricSpec()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ATP, ATP2 = AttributionMethod.parse("atp"), AttributionMethod.parse("atp2")


def _pairs(batch: int = 3, seq: int = 6, vocab: int = 40, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, seq), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1 : seq - 1] = torch.randint(0, vocab, (batch, seq - 2), generator=generator)
    return clean, corrupt, torch.full((batch,), seq), torch.arange(1, batch + 1), torch.arange(5, 8)


def _quadratic_model():
    """Layer-0 nodes reach the metric through x ↦ x² only.

    No norms; layer 0's MLP is linear and layer 1's attention writes a constant,
    so past layer 0's attention everything is affine except layer 1's MLP.
    """
    model = build_tiny_model(normalization=None, seed=2)
    with torch.no_grad():
        model.blocks[1].attn.W_O.zero_()
    model.blocks[0].mlp.act_fn = lambda x: x
    model.blocks[1].mlp.act_fn = lambda x: 0.3 * x * x
    sae = build_tiny_sae(model, HookSite(layer=0, point="resid_post"), seed=1)
    return model, [sae]


def _single_nodes(model, saes, kinds, position):
    """One selection per node, so the HVP's direction is that node's own patch."""
    out = []
    for kind in kinds:
        selection = NodeSelection(kinds=[kind], layers=[0], positions=[position])
        result = run_atp(model, saes, *_args(_pairs()), selection, method=ATP)
        for node in result.nodes():
            units = {"features": [node.index]} if kind == "feature" else {}
            if kind in ("z", "q", "k", "v") and node.index is not None:
                units = {"heads": [node.index]}
            out.append((node, selection.model_copy(update=units)))
    return out


def _args(data):
    clean, corrupt, lengths, answer, wrong = data
    return clean, corrupt, lengths, METRIC, answer, wrong


def _exact(model, saes, nodes, data, fraction=1.0):
    clean, corrupt, lengths, answer, wrong = data
    return exact_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes,
        corrupt_tokens=corrupt, fraction=fraction,
    )  # fmt: skip


def _scores(model, saes, selection, method, data):
    result = run_atp(model, saes, *_args(data), selection, method=method)
    return result.per_prompt(), result.nodes()


QUADRATIC_KINDS = ["z", "v", "mlp", "feature", "sae_error"]


def test_atp2_equals_exact_patching_where_the_downstream_path_is_quadratic():
    model, saes = _quadratic_model()
    data = _pairs()
    singles = [
        s for kind in QUADRATIC_KINDS for s in _single_nodes(model, saes, [kind], "last")[:2]
    ]
    singles += _single_nodes(model, saes, ["v"], 2)[:2]  # through layer 0's fixed pattern
    assert {node.kind for node, _ in singles} == set(QUADRATIC_KINDS)
    first_order_off = 0
    for node, selection in singles:
        (atp2, nodes) = _scores(model, saes, selection, ATP2, data)
        (atp, _) = _scores(model, saes, selection, ATP, data)
        assert nodes == [node]
        exact = _exact(model, saes, [node], data)
        torch.testing.assert_close(atp2, exact, rtol=1e-9, atol=1e-10, msg=str(node))
        first_order_off += float((atp - exact).abs().max()) > 1e-3
    assert first_order_off >= len(singles) // 2  # the second-order term matters


def test_atp2_equals_exact_patching_for_a_neuron_whose_path_is_quadratic():
    """Neurons are selected all together; silencing all but one removes the interactions."""
    model, saes = _quadratic_model()
    with torch.no_grad():
        live = model.blocks[0].mlp.W_out[3].clone()
        model.blocks[0].mlp.W_out.zero_()
        model.blocks[0].mlp.W_out[3] = live
    data = _pairs()
    selection = NodeSelection(kinds=["neuron"], layers=[0], positions=["last"])
    atp2, nodes = _scores(model, saes, selection, ATP2, data)
    atp, _ = _scores(model, saes, selection, ATP, data)
    exact = _exact(model, saes, nodes, data)
    torch.testing.assert_close(atp2, exact, rtol=1e-9, atol=1e-10)
    assert float((atp[:, 3] - exact[:, 3]).abs().max()) > 1e-3


def test_atp2_terms_of_a_joint_patch_add_up_to_it_when_quadratic():
    """With several nodes selected, v is their joint patch: the terms sum to its Δm."""
    model, saes = _quadratic_model()
    data = _pairs()
    selection = NodeSelection(kinds=["z"], layers=[0], positions=["last"])
    atp2, nodes = _scores(model, saes, selection, ATP2, data)
    clean, corrupt, lengths, answer, wrong = data
    joint, _, _, _ = subset_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes,
        torch.ones(1, len(nodes), dtype=torch.bool), corrupt_tokens=corrupt,
    )  # fmt: skip
    torch.testing.assert_close(atp2.sum(1), joint[0], rtol=1e-9, atol=1e-10)
    single = _exact(model, saes, nodes, data)
    assert float((atp2 - single).abs().max()) > 1e-4  # interactions are shared out


def test_second_order_term_is_the_finite_difference_of_partial_patches():
    """Δm(f) = f·AtP + f²·c₂ + O(f³): c₂ from exact_patch(fraction=f), Richardson-extrapolated.

    On an ordinary model (norms, GELU, softmax), every node kind; neurons are
    selected all together, so all but one are silenced (no interactions).
    """
    model = build_tiny_model(seed=5)
    with torch.no_grad():
        live = model.blocks[0].mlp.W_out[3].clone()
        model.blocks[0].mlp.W_out.zero_()
        model.blocks[0].mlp.W_out[3] = live
    saes = [build_tiny_sae(model, HookSite(layer=0, point="resid_post"), seed=2)]
    data = _pairs(seed=7)
    kinds = ["z", "q", "k", "v", "mlp", "feature", "sae_error"]
    singles = [
        single for kind in kinds for single in _single_nodes(model, saes, [kind], "last")[:2]
    ]
    singles += [
        single for kind in ("k", "v") for single in _single_nodes(model, saes, [kind], 2)[:1]
    ]
    neurons = NodeSelection(kinds=["neuron"], layers=[0], positions=["last"])
    singles.append((_scores(model, saes, neurons, ATP, data)[1][3], neurons))
    checked = 0
    for node, selection in singles:
        atp, nodes = _scores(model, saes, selection, ATP, data)
        atp2, _ = _scores(model, saes, selection, ATP2, data)
        column = nodes.index(node)
        c2 = (atp2 - atp)[:, column]
        first = atp[:, column]
        step = 1e-2
        coeff = [
            (_exact(model, saes, [node], data, fraction=f)[:, 0] - f * first) / f**2
            for f in (step, step / 2)
        ]
        reference = 2 * coeff[1] - coeff[0]
        scale = float(reference.abs().max())
        torch.testing.assert_close(c2, reference, rtol=0, atol=1e-3 * scale + 1e-9, msg=str(node))
        checked += scale > 1e-6
    assert checked >= len(singles) // 2  # most nodes have a real second-order term


def test_atpstar2_adds_the_term_to_atpstar_and_leaves_qk_fixed_nodes_alone():
    model = build_tiny_model(seed=5)
    data = _pairs(seed=7)
    selection = NodeSelection(kinds=["z", "q", "k"], positions=["last", 3])
    star = run_atp(model, [], *_args(data), selection, method=AttributionMethod.parse("atpstar"))
    star2 = run_atp(model, [], *_args(data), selection, method=AttributionMethod.parse("atpstar2"))
    plain = run_atp(model, [], *_args(data), selection, method=ATP)
    plain2 = run_atp(model, [], *_args(data), selection, method=ATP2)
    assert star2.method == "atpstar2" and plain2.method == "atp2"
    assert star.signed is not None and star2.signed is not None
    for i, group in enumerate(star.groups):
        if group.kind in ("q", "k"):
            torch.testing.assert_close(star2.signed[i], star.signed[i], equal_nan=True)
        else:
            term = plain2.scores[i] - plain.scores[i]
            torch.testing.assert_close(star2.signed[i] - star.signed[i], term, equal_nan=True)
            assert float(term.nan_to_num().abs().max()) > 1e-6
    # GradDrop's magnitudes move with the term too.
    moved = [not torch.equal(a, b) for a, b in zip(star2.scores, star.scores, strict=True)]
    assert any(moved)


def test_method_names_parse_and_report():
    assert AttributionMethod.parse("atp2") == AttributionMethod(second_order=True)
    assert AttributionMethod.parse("ATPstar2") == AttributionMethod(
        qk_fix=True, graddrop=True, second_order=True
    )
    for name in ("atp2", "atpstar2", "atp_qk2", "atp_graddrop2", "atp", "atpstar"):
        assert AttributionMethod.parse(name).name == name
