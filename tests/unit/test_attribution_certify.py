"""Certified verification (random-subset patching) by intervention on tiny float64 models.

References: exact single-node patching (``exact_patch``) for the effects the
bound must cover, and, where effects add up exactly (neurons of the last MLP
read by a linear unembedding with no final norm), the closed form of the
difference-of-means estimator given the drawn subsets.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from circuitscan.pipelines.attribution import exact_patch, run_atp
from circuitscan.pipelines.attribution.certify import (
    certify,
    subset_patch,
    verify_until_certified,
)
from circuitscan.pipelines.attribution.errors import AttributionInputError
from circuitscan.pipelines.attribution.subset_stats import (
    CertificationSums,
    certification_result,
    certification_sums,
    draw_subsets,
    subset_bounds,
    t_quantile_two_sided,
)
from circuitscan.schemas.attribution import Node, NodeSelection
from circuitscan.schemas.certification import CertificationResult
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model, build_tiny_sae

METRIC = MetricSpec()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(batch: int = 3, seq: int = 6, vocab: int = 40, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, seq), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1 : seq - 1] = torch.randint(0, vocab, (batch, seq - 2), generator=generator)
    lengths = torch.full((batch,), seq)
    answer = torch.arange(1, batch + 1)
    wrong = torch.arange(5, batch + 5)
    return clean, corrupt, lengths, answer, wrong


def _run(model, saes, nodes, data, **kwargs):
    clean, corrupt, lengths, answer, wrong = data
    return certify(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt, **kwargs
    )


def _exact(model, saes, nodes, data):
    clean, corrupt, lengths, answer, wrong = data
    return exact_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt
    )


def _additive_model(planted: int | None = None):
    """No final norm and neurons of the last MLP: Δm of any neuron set is the sum of each."""
    model = build_tiny_model(normalization=None, seed=1)
    if planted is not None:
        with torch.no_grad():
            model.blocks[1].mlp.W_out[planted] *= 25.0
    nodes = [Node(kind="neuron", layer=1, index=i, position="last") for i in range(32)]
    return model, nodes


def test_t_quantile_matches_reference_values():
    # scipy.stats.t.ppf(1 - tail / 2, df), written out.
    for tail, df, want in [
        (0.05, 1, 12.706204736174694),
        (0.05, 2, 4.302652729749462),
        (0.05, 10, 2.228138851986274),
        (1e-4, 7, 7.884584262416738),
        (1e-6, 200, 5.0482856598700385),
        (0.01, 31, 2.744041919294269),
    ]:
        assert t_quantile_two_sided(tail, df) == pytest.approx(want, rel=1e-9)


def test_singleton_subsets_equal_exact_patching_for_every_kind():
    """Subsets of one node each are exact patching: features, errors, heads, neurons, MLPs."""
    model = build_tiny_model()
    site = HookSite.parse("L1.resid_pre")
    saes = [build_tiny_sae(model, site)]
    data = _pairs()
    nodes = [
        *(Node(kind="feature", layer=1, point="resid_pre", index=i, position=4) for i in range(6)),
        Node(kind="sae_error", layer=1, point="resid_pre", position=3),
        Node(kind="z", layer=0, index=2, position=2),
        Node(kind="q", layer=1, index=1, position="last"),
        Node(kind="k", layer=1, index=3, position=1),
        Node(kind="v", layer=0, index=0, position=4),
        Node(kind="neuron", layer=0, index=5, position=3),
        Node(kind="mlp", layer=1, position="last"),
    ]
    clean, corrupt, lengths, answer, wrong = data
    subsets = torch.eye(len(nodes), dtype=torch.bool)
    delta_m, known_zero, undefined, _ = subset_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes, subsets, corrupt_tokens=corrupt
    )
    exact = _exact(model, saes, nodes, data)
    torch.testing.assert_close(delta_m, exact.T, rtol=0, atol=1e-10)
    assert not bool(undefined.any())
    assert bool((exact.T[known_zero.T] == 0).all())


def test_subset_patch_is_the_sum_of_single_effects_when_they_add_up():
    model, nodes = _additive_model()
    data = _pairs()
    exact = _exact(model, [], nodes, data)  # [batch, n]
    subsets = draw_subsets(len(nodes), 12, 0.3, seed=5)
    clean, corrupt, lengths, answer, wrong = data
    delta_m, *_ = subset_patch(
        model, [], clean, lengths, METRIC, answer, wrong, nodes, subsets,
        corrupt_tokens=corrupt, batch_size=7,
    )  # fmt: skip
    torch.testing.assert_close(delta_m, subsets.double() @ exact.T, rtol=0, atol=1e-10)


def test_estimates_follow_the_closed_form_and_approach_exact_effects_when_additive():
    model, nodes = _additive_model()
    data = _pairs()
    exact = _exact(model, [], nodes, data)
    errors = []
    for samples in (40, 640):
        result = _run(model, [], nodes, data, samples=samples, p=0.3, seed=2)
        x = draw_subsets(len(nodes), samples, 0.3, seed=2).double()
        # ĉ_n − c_n = Σ_{m≠n} c_m (mean of x_m where n is in − mean where n is out)
        imbalance = (x.T @ x) / x.sum(0)[:, None] - ((1 - x).T @ x) / (1 - x).sum(0)[:, None]
        imbalance.fill_diagonal_(0.0)
        # Pairs whose patch changes nothing (dead neurons: exactly 0) are known zeros.
        per_prompt = torch.where(exact == 0, 0.0, exact + exact @ imbalance.T)
        want = per_prompt.mean(0)  # [n], mean over prompts
        got = torch.tensor([{n.node: n.estimate for n in result.nodes}[str(n)] for n in nodes],
                           dtype=torch.float64)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        errors.append(float((got - exact.mean(0)).abs().max()))
    assert errors[1] < 0.5 * errors[0]
    assert errors[1] < 0.15 * float(exact.abs().mean(0).max())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bound_covers_the_true_largest_effect_on_a_nonlinear_model(seed):
    model = build_tiny_model()
    data = _pairs(seed=seed + 10)
    nodes = [
        Node(kind="z", layer=layer, index=head, position=pos)
        for layer in range(2)
        for head in range(4)
        for pos in range(1, 6)
    ]
    true_max = float(_exact(model, [], nodes, data).abs().nanmean(0).max())
    result = _run(model, [], nodes, data, samples=60, p=0.25, seed=seed)
    assert result.bounded
    assert result.theta >= true_max > 0
    assert result.n_nodes == len(nodes) and result.forward_passes == 60
    assert result.binding_node == result.nodes[0].node
    assert result.nodes[0].upper == result.theta


def test_bound_shrinks_with_samples_and_the_planted_node_comes_closest():
    planted = 29
    model, nodes = _additive_model(planted=planted)
    data = _pairs()
    effect = _exact(model, [], nodes, data).abs().mean(0)
    assert int(effect.argmax()) == planted and float(effect.topk(2).values[1]) < 0.3 * float(
        effect.max()
    )
    thetas = []
    for samples in (30, 300):
        result = _run(model, [], nodes, data, samples=samples, p=0.3, seed=4)
        assert result.theta >= float(effect.max())
        assert result.closest_node == str(nodes[planted])
        thetas.append(result.theta)
    assert thetas[1] < thetas[0]
    assert thetas[1] < 1.5 * float(effect.max())


def test_a_node_sampled_too_rarely_leaves_the_bound_infinite_and_it_round_trips():
    model, nodes = _additive_model()
    result = _run(model, [], nodes, _pairs(), samples=3, p=0.1, seed=0)
    assert not result.bounded and math.isinf(result.theta)
    assert result.statement().startswith("no bound at 95 %")
    again = CertificationResult.model_validate_json(result.model_dump_json())
    assert again == result


def test_statement_names_theta_and_confidence():
    model, nodes = _additive_model()
    result = _run(model, [], nodes[:4], _pairs(), samples=20, p=0.5, confidence=0.9)
    assert result.statement() == f"no unverified node exceeds {result.theta:.4g} (90 %)"
    assert result.delta == pytest.approx(0.1)
    assert any("Additivity" in text for text in result.assumptions)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"samples": 1}, "samples must be at least 2"),
        ({"samples": 10, "p": 0.0}, "p \\(inclusion probability\\)"),
        ({"samples": 10, "p": 1.0}, "p \\(inclusion probability\\)"),
        ({"samples": 10, "confidence": 1.0}, "confidence must be in"),
        ({"samples": 10, "confidence": 0.0}, "confidence must be in"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    model, nodes = _additive_model()
    with pytest.raises(AttributionInputError, match=message):
        _run(model, [], nodes, _pairs(), **kwargs)


def test_no_nodes_is_refused():
    model, _ = _additive_model()
    with pytest.raises(AttributionInputError, match="no nodes to certify"):
        _run(model, [], [], _pairs(), samples=10)


def test_subset_bounds_are_welch_t_bounds_with_a_union_over_pairs():
    """Each (prompt, node) bound is |difference of means| + t(δ/M, Welch df) · Welch se."""
    generator = torch.Generator().manual_seed(0)
    subsets = draw_subsets(5, 30, 0.4, seed=1)
    y = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    known_zero = torch.zeros(2, 5, dtype=torch.bool)
    known_zero[1, 4] = True
    undefined = torch.zeros(2, 5, dtype=torch.bool)
    undefined[0, 0] = True
    estimate, upper, counted = subset_bounds(y, subsets, known_zero, undefined, 0.05)
    assert int(counted.sum()) == 8
    for b, j in [(0, 1), (1, 3)]:
        inside, outside = y[subsets[:, j], b].tolist(), y[~subsets[:, j], b].tolist()
        a = statistics.variance(inside) / len(inside)
        c = statistics.variance(outside) / len(outside)
        df = math.floor((a + c) ** 2 / (a**2 / (len(inside) - 1) + c**2 / (len(outside) - 1)))
        diff = statistics.fmean(inside) - statistics.fmean(outside)
        want = abs(diff) + t_quantile_two_sided(0.05 / 8, df) * math.sqrt(a + c)
        assert float(estimate[b, j]) == pytest.approx(diff, abs=1e-12)
        assert float(upper[b, j]) == pytest.approx(want, rel=1e-12)
    assert float(upper[1, 4]) == 0.0 and float(estimate[1, 4]) == 0.0
    assert math.isnan(float(upper[0, 0]))


def test_shards_summed_equal_one_call_with_the_same_union_size():
    """A job's shards (same subsets, union over nodes × all prompts) merge into the direct result.

    The second shard's prompts are shorter, so the nodes at the last index exist
    nowhere in it: a shard of a larger prompt set patches what it has.
    """
    model = build_tiny_model()
    nodes = [Node(kind="z", layer=layer, index=head, position=pos)
             for layer in range(2) for head in range(4) for pos in (2, 5)]  # fmt: skip
    clean, corrupt, lengths, answer, wrong = _pairs(batch=4)
    lengths = torch.tensor([6, 6, 4, 5])
    union = len(nodes) * 4
    kwargs = {"samples": 24, "p": 0.3, "seed": 7}
    direct = certify(
        model, [], clean, lengths, METRIC, answer, wrong, nodes,
        corrupt_tokens=corrupt, corrupt_lengths=lengths, union_size=union, **kwargs,
    )  # fmt: skip
    subsets = draw_subsets(len(nodes), 24, 0.3, seed=7)
    parts = []
    for rows in (slice(0, 2), slice(2, 4)):
        delta_m, zero, undefined, ran = subset_patch(
            model, [], clean[rows], lengths[rows], METRIC, answer[rows], wrong[rows], nodes,
            subsets, corrupt_tokens=corrupt[rows], corrupt_lengths=lengths[rows],
            allow_absent=True,
        )  # fmt: skip
        parts.append(certification_sums(delta_m, subsets, zero, undefined, 0.05, rows=ran,
                                        union_size=union))  # fmt: skip
    merged = certification_result(nodes, CertificationSums.merge(parts), n_prompts=4,
                                  mode="corrupt", confidence=0.95, **kwargs)  # fmt: skip
    assert merged.patched_rows == direct.patched_rows and merged.n_nodes == direct.n_nodes
    for a, b in zip(merged.nodes, direct.nodes, strict=True):
        assert a.node == b.node and a.included == b.included
        assert a.upper == pytest.approx(b.upper, rel=1e-12)
        assert a.estimate == pytest.approx(b.estimate, rel=1e-12, abs=1e-15)
    assert merged.theta == pytest.approx(direct.theta, rel=1e-12)
    with pytest.raises(AttributionInputError, match="out of range for every prompt"):
        subset_patch(model, [], clean[2:], lengths[2:], METRIC, answer[2:], wrong[2:], nodes,
                     subsets, corrupt_tokens=corrupt[2:], corrupt_lengths=lengths[2:])  # fmt: skip


def _atp_order(model, saes, selection, data):
    """The selection's nodes by AtP's mean |estimate| over the prompts, largest first."""
    clean, corrupt, lengths, answer, wrong = data
    result = run_atp(model, saes, clean, corrupt, lengths, METRIC, answer, wrong, selection)
    estimate = result.per_prompt().abs().nanmean(0).nan_to_num(0.0)
    nodes = result.nodes()
    order = sorted(range(len(nodes)), key=lambda i: (-float(estimate[i]), i))
    return [nodes[i] for i in order], estimate[order]


def test_bound_is_calibrated_over_20_seeds_with_planted_effects():
    """Verify AtP's top 4, bound the rest: θ covers the true largest unverified effect ≥ 19/20."""
    selection = NodeSelection(kinds=["z"], positions=[3, 5])
    covered, ratios = 0, []  # θ / true, printed when it fails
    model = build_tiny_model(seed=100)
    original = [block.attn.W_O.detach().clone() for block in model.blocks]
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        layer, head = (int(x) for x in torch.randint(0, 4, (2,), generator=generator))
        with torch.no_grad():  # a planted head, several times stronger than the rest
            for block, w_o in zip(model.blocks, original, strict=True):
                block.attn.W_O.copy_(w_o)
            model.blocks[layer % 2].attn.W_O[head] *= 3.0
        data = _pairs(seed=200 + seed)
        ranked, _ = _atp_order(model, [], selection, data)
        rest = ranked[4:]
        true_max = float(_exact(model, [], rest, data).abs().nanmean(0).max())
        result = _run(model, [], rest, data, samples=40, p=0.25, seed=seed)
        # An infinite θ (a node sampled too rarely) covers trivially: it does not count.
        covered += math.isfinite(result.theta) and result.theta >= true_max
        ratios.append(result.theta / true_max)
    assert covered >= 19, ratios


def _planted_last():
    """One prompt; a head whose AtP is exactly 0 and whose exact effect is the largest.

    No norms; the head's output is made orthogonal to the answer's readout (no
    direct effect) and read only by a last MLP that squares its input, whose
    pre-activations are 0 on the clean prompt (zero gradient there).
    """
    head = 2
    model = build_tiny_model(normalization=None, seed=2)
    data = _pairs(batch=1, seed=11)
    clean, _, _, answer, wrong = data
    readout = model.W_U[:, answer[0]] - model.W_U[:, wrong[0]]
    with torch.no_grad():
        model.blocks[1].attn.W_O.zero_()
        model.blocks[0].mlp.W_out.zero_()
        w_o = model.blocks[0].attn.W_O[head]
        w_o -= torch.outer(w_o @ readout, readout) / readout.dot(readout)
        w_o *= 4.0
    model.blocks[1].mlp.act_fn = lambda x: 0.3 * x * x
    _, cache = model.run_with_cache(clean, names_filter="blocks.1.hook_resid_mid")
    with torch.no_grad():
        model.blocks[1].mlp.b_in.copy_(
            -(cache["blocks.1.hook_resid_mid"][0, -1] @ model.blocks[1].mlp.W_in)
        )
    return model, data, Node(kind="z", layer=0, index=head, position="last")


def test_a_planted_node_ranked_last_by_atp_is_caught():
    model, data, planted = _planted_last()
    selection = NodeSelection(kinds=["z", "v"], layers=[0], positions=[1, 2, 3, 4, "last"])
    ranked, estimate = _atp_order(model, [], selection, data)
    at = ranked.index(planted)
    assert float(estimate[at]) < 1e-9  # AtP sees nothing: tied for last
    truth = _exact(model, [], ranked, data).abs().nanmean(0)
    assert int(truth.argmax()) == at and float(truth[at]) > 3 * float(truth.topk(2).values[1])
    result = _run(model, [], ranked[5:], data, samples=40, p=0.25, seed=1)
    assert result.theta >= float(truth[at])
    # Flagged: its estimate is the largest (another node's wider interval may set θ).
    assert result.closest_node == str(planted)


def _auto(model, ranked, data, **kwargs):
    clean, corrupt, lengths, answer, wrong = data
    return verify_until_certified(
        model, [], clean, lengths, METRIC, answer, wrong, ranked, corrupt_tokens=corrupt, **kwargs
    )


def test_auto_verification_stops_when_the_bound_shows_the_top_k_complete():
    planted = 29
    model, nodes = _additive_model(planted=planted)
    with torch.no_grad():  # a second strong node, so the true top-2 stands clear of the rest
        model.blocks[1].mlp.W_out[3] *= 10.0
    data = _pairs()
    truth = _exact(model, [], nodes, data).abs().mean(0)
    order = truth.argsort(descending=True).tolist()
    by_truth = [nodes[i] for i in order]
    assert set(order[:2]) == {planted, 3}
    # Estimate order with the strongest node 7th: the first three rounds cannot end it.
    ranked = [*by_truth[1:7], by_truth[0], *by_truth[7:]]
    exact, bound, auto = _auto(model, ranked, data, top_k=2, samples=100, p=0.3, budget=12)
    assert auto.stopped_by == "bound", auto
    assert auto.verified == 8 and auto.rounds == 4
    assert auto.max_rounds == 6 and bound is not None
    assert bound.confidence == pytest.approx(1 - 0.05 / 6)
    assert auto.theta == bound.theta < auto.smallest_top_effect
    assert exact.shape == (3, 8)
    torch.testing.assert_close(exact, _exact(model, [], ranked[:8], data))
    assert auto.smallest_top_effect == pytest.approx(float(truth[order[1]]))  # the true #2
    assert auto.forward_passes == 8 + 4 * 100
    assert auto.statement().startswith("top-2 complete at 95 %: no unverified node exceeds")

    _, _, spent = _auto(model, ranked, data, top_k=2, samples=100, p=0.3, budget=4)
    assert (spent.stopped_by, spent.verified, spent.complete) == ("budget", 4, False)
    assert "not shown complete" in spent.statement()
    _, none_left, every = _auto(model, ranked[:2], data, top_k=2, samples=10, p=0.3)
    assert (every.stopped_by, every.verified, none_left) == ("exhausted", 2, None)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"top_k": 4, "budget": 2}, "below top_k"),
        ({"top_k": 2, "confidence": 1.5}, "confidence must be in"),
    ],
)
def test_auto_verification_refuses_bad_parameters(kwargs, message):
    model, nodes = _additive_model()
    with pytest.raises(AttributionInputError, match=message):
        _auto(model, nodes, _pairs(), samples=10, **kwargs)


def test_a_control_variate_keeps_the_estimate_and_removes_the_other_nodes_spread():
    """With additive effects, each subset's Δm less its nodes' controls leaves only their errors.

    Exact effects as the control: every residual is 0, so each estimate is the
    exact effect and its bound is |effect| (no spread left). A noisy control:
    the closed form of the plain estimator with c − a in place of c, plus a.
    """
    model, nodes = _additive_model(planted=29)
    data = _pairs()
    clean, corrupt, lengths, answer, wrong = data
    exact = _exact(model, [], nodes, data)  # [batch, n]
    subsets = draw_subsets(len(nodes), 60, 0.3, seed=3)
    delta_m, zero, undefined, _ = subset_patch(
        model, [], clean, lengths, METRIC, answer, wrong, nodes, subsets, corrupt_tokens=corrupt
    )
    estimate, upper, _ = subset_bounds(delta_m, subsets, zero, undefined, 0.05, control=exact)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(upper, exact.abs(), rtol=0, atol=1e-10)

    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(0), dtype=exact.dtype)
    control = exact * (1.0 + 0.2 * noise)  # each node's estimate 20 % off, at random
    estimate, _, _ = subset_bounds(delta_m, subsets, zero, undefined, 0.05, control=control)
    x = subsets.double()
    imbalance = (x.T @ x) / x.sum(0)[:, None] - ((1 - x).T @ x) / (1 - x).sum(0)[:, None]
    imbalance.fill_diagonal_(0.0)
    active = exact != 0  # dead neurons are known zeros: never patched, estimate 0
    error = torch.where(active, exact - control, 0.0)
    want = torch.where(active, exact + error @ imbalance.T, 0.0)
    torch.testing.assert_close(estimate, want, rtol=0, atol=1e-10)

    plain = certify(model, [], clean, lengths, METRIC, answer, wrong, nodes, samples=60, p=0.3,
                    seed=3, corrupt_tokens=corrupt)  # fmt: skip
    controlled = certify(model, [], clean, lengths, METRIC, answer, wrong, nodes, samples=60,
                         p=0.3, seed=3, corrupt_tokens=corrupt, control=control,
                         control_name="noisy")  # fmt: skip
    assert controlled.control == "noisy" and plain.control is None
    effect = float(exact.abs().mean(0).max())
    assert plain.theta >= controlled.theta >= effect
    with pytest.raises(AttributionInputError, match=r"control .* must be \[prompts, nodes\]"):
        subset_bounds(delta_m, subsets, zero, undefined, 0.05, control=exact[:, :3])
