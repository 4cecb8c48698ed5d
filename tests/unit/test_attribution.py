"""AtP / AtP* against exact patching on tiny float64 models where the estimate is exact."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.attribution import (
    exact_patch,
    feature_attribution,
    recall_at_k,
    run_atp,
    verify,
    verify_by_patching,
)
from circuitscan.schemas.attribution import AttributionMethod, Node, NodeSelection
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model, build_tiny_sae

METRIC = MetricSpec()


def _pair(batch: int = 3, seq: int = 7, vocab: int = 40, flip: tuple[int, ...] = (2,)):
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (batch, seq), generator=generator)
    corrupt = clean.clone()
    for pos in flip:
        corrupt[:, pos] = torch.randint(0, vocab, (batch,), generator=generator)
    lengths = torch.tensor([seq, seq - 1, seq - 2][:batch])
    answer = torch.tensor([1, 2, 3][:batch])
    wrong = torch.tensor([4, 5, 6][:batch])
    return clean, corrupt, lengths, answer, wrong


def _compare(model, saes, selection, method, *, absolute=False):
    clean, corrupt, lengths, answer, wrong = _pair()
    result = run_atp(
        model, saes, clean, corrupt, lengths, METRIC, answer, wrong, selection, method=method
    )
    nodes = result.nodes()
    exact = exact_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt
    )
    estimate = result.per_prompt()
    truth = exact.abs() if absolute else exact
    assert torch.equal(torch.isnan(estimate), torch.isnan(truth))
    assert float(truth.nan_to_num(0).abs().max()) > 1e-3  # the patches do something
    return estimate, truth, nodes


@pytest.mark.parametrize("gqa", [False, True])
def test_atp_exact_on_linear_paths(gqa):
    """Last-layer z/v and hook_z SAE nodes of an attention-only, norm-free model: AtP = patching."""
    kwargs = {"n_key_value_heads": 2, "positional": "rotary"} if gqa else {}
    model = build_tiny_model(normalization=None, attn_only=True, **kwargs)
    site = HookSite(layer=1, point="z")
    saes = {site: build_tiny_sae(model, site)}
    selection = NodeSelection(kinds=["z", "v", "feature", "sae_error"], layers=[1])
    estimate, truth, _ = _compare(model, saes, selection, AttributionMethod())
    torch.testing.assert_close(estimate, truth, atol=1e-9, rtol=0, equal_nan=True)


def test_atp_exact_for_last_layer_neurons():
    """mlp_post of the last layer reaches the logits linearly without a final norm."""
    model = build_tiny_model(normalization=None)
    selection = NodeSelection(kinds=["neuron", "mlp"], layers=[1], positions="last")
    estimate, truth, _ = _compare(model, None, selection, AttributionMethod())
    torch.testing.assert_close(estimate, truth, atol=1e-9, rtol=0)


@pytest.mark.parametrize("gqa", [False, True])
def test_qk_fix_exact_for_queries_and_keys(gqa):
    """With the rest of the path linear, the exact softmax row makes q/k estimates exact."""
    kwargs = {"n_key_value_heads": 2, "positional": "rotary"} if gqa else {}
    model = build_tiny_model(normalization=None, attn_only=True, **kwargs)
    selection = NodeSelection(kinds=["q", "k"], layers=[1])
    plain, truth, _ = _compare(model, None, selection, AttributionMethod())
    fixed, truth, _ = _compare(model, None, selection, AttributionMethod(qk_fix=True))
    torch.testing.assert_close(fixed, truth, atol=1e-9, rtol=0, equal_nan=True)
    # Plain AtP linearises through the softmax and is measurably off.
    assert float((plain - truth).nan_to_num(0).abs().max()) > 1e-3


def test_position_map_pairs_prompts_of_different_lengths():
    """Corrupted prompts two tokens longer (an extra preamble), paired from the end:
    AtP* stays exact where it is exact without a map, exact patching equals a hand-made
    patch of the mapped corrupted activation, and an identity map changes nothing."""
    from circuitscan.pipelines.attribution.positions import end_aligned_map

    model = build_tiny_model(normalization=None, attn_only=True, n_key_value_heads=2)
    clean, corrupt, lengths, answer, wrong = _pair()
    generator = torch.Generator().manual_seed(5)
    extra = torch.randint(0, 40, (clean.shape[0], 2), generator=generator)
    longer = torch.cat([corrupt[:, :1], extra, corrupt[:, 1:]], dim=1)
    longer_lengths = lengths + 2
    position_map = end_aligned_map(lengths, longer_lengths, clean.shape[1])
    assert position_map[0].tolist() == [0, 3, 4, 5, 6, 7, 8]
    assert position_map[2, 5:].tolist() == [-1, -1]  # padding
    selection = NodeSelection(kinds=["z", "v", "q", "k"], layers=[1])
    args = (model, None, clean, longer, lengths, METRIC, answer, wrong, selection)
    kwargs = {"corrupt_lengths": longer_lengths, "position_map": position_map}
    result = run_atp(*args, method=AttributionMethod(qk_fix=True), **kwargs)
    nodes = result.nodes()
    patch_args = (model, None, clean, lengths, METRIC, answer, wrong, nodes)
    exact = exact_patch(*patch_args, corrupt_tokens=longer, **kwargs)
    assert float(exact.nan_to_num(0).abs().max()) > 1e-3
    torch.testing.assert_close(result.per_prompt(), exact, atol=1e-9, rtol=0, equal_nan=True)

    # By hand: clean run with one z entry replaced by the corrupted run's at the mapped position.
    from circuitscan.pipelines.metrics import metric_per_prompt

    with torch.no_grad():
        _, cache = model.run_with_cache(longer)

    def metric(logits):
        return metric_per_prompt(logits, METRIC, lengths=lengths, answer=answer, wrong=wrong)

    with torch.no_grad():
        base = metric(model(clean))
    z_nodes = [(i, n) for i, n in enumerate(nodes) if n.kind == "z"][:6]
    for column, node in z_nodes:
        name = f"blocks.{node.layer}.attn.hook_z"
        at = int(node.position)  # type: ignore[arg-type]

        def hook(z, hook=None, at=at, head=node.index, source_z=cache[name]):
            z = z.clone()
            for b in range(z.shape[0]):
                source = int(position_map[b, at])
                if at < int(lengths[b]) and source >= 0:
                    z[b, at, head] = source_z[b, source, head]
            return z

        with torch.no_grad():
            manual = metric(model.run_with_hooks(clean, fwd_hooks=[(name, hook)])) - base
        for b in range(clean.shape[0]):
            if not torch.isnan(exact[b, column]):
                assert abs(float(exact[b, column] - manual[b])) < 1e-9

    # Equal lengths with the identity map: the same as no map at all.
    identity = torch.arange(clean.shape[1]).expand_as(clean)
    plain = run_atp(model, None, clean, corrupt, lengths, METRIC, answer, wrong, selection)
    mapped = run_atp(
        model, None, clean, corrupt, lengths, METRIC, answer, wrong, selection,
        position_map=identity,
    )  # fmt: skip
    torch.testing.assert_close(mapped.per_prompt(), plain.per_prompt(), equal_nan=True)


def test_graddrop_without_cancellation_is_abs_atp():
    """Last-layer nodes have one path; dropping any other layer leaves it, so GD = |AtP|."""
    model = build_tiny_model(normalization=None, attn_only=True, n_layers=3)
    selection = NodeSelection(kinds=["z", "q", "k"], layers=[2])
    star, truth, _ = _compare(
        model, None, selection, AttributionMethod(qk_fix=True, graddrop=True), absolute=True
    )
    torch.testing.assert_close(star, truth, atol=1e-9, rtol=0, equal_nan=True)


def test_graddrop_layer_terms_match_manual_backward(tiny_model):
    """GradDrop on every layer equals autograd with hook-zeroed attn_out/mlp_out gradients."""
    clean, corrupt, lengths, answer, wrong = _pair()
    site = HookSite(layer=1, point="resid_pre")
    saes = {site: build_tiny_sae(tiny_model, site)}
    selection = NodeSelection(kinds=["z", "feature", "neuron"], positions="last")
    star = run_atp(
        tiny_model,
        saes,
        clean,
        corrupt,
        lengths,
        METRIC,
        answer,
        wrong,
        selection,
        method=AttributionMethod(graddrop=True),
    )
    plain = run_atp(tiny_model, saes, clean, corrupt, lengths, METRIC, answer, wrong, selection)
    # Reference: the mean over layers of |AtP_l| where AtP_l uses a gradient with the
    # layer's outputs blocked, computed by brute force through backward hooks.
    manual = torch.zeros_like(plain.per_prompt())
    for layer in range(tiny_model.cfg.n_layers):
        handles = [
            getattr(tiny_model.blocks[layer], name).register_full_backward_pre_hook(
                lambda module, grad: (torch.zeros_like(grad[0]),)
            )
            for name in ("hook_attn_out", "hook_mlp_out")
        ]
        try:
            dropped = run_atp(
                tiny_model, saes, clean, corrupt, lengths, METRIC, answer, wrong, selection
            )
        finally:
            for handle in handles:
                handle.remove()
        manual += dropped.per_prompt().abs()
    manual /= tiny_model.cfg.n_layers - 1
    torch.testing.assert_close(star.per_prompt(), manual, atol=1e-9, rtol=0)


def test_feature_attribution_is_activation_times_gradient():
    """a·∂m/∂a is exact for zero-ablating a hook_z feature on a linear path (up to sign)."""
    model = build_tiny_model(normalization=None, attn_only=True)
    site = HookSite(layer=1, point="z")
    saes = {site: build_tiny_sae(model, site)}
    clean, _, lengths, answer, wrong = _pair()
    result = feature_attribution(model, saes, clean, lengths, METRIC, answer, wrong)
    exact = exact_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, result.nodes(), mode="zero"
    )
    torch.testing.assert_close(result.per_prompt(), -exact, atol=1e-9, rtol=0, equal_nan=True)


def test_named_positions_and_aggregates():
    model = build_tiny_model(normalization=None, attn_only=True)
    clean, corrupt, lengths, answer, wrong = _pair()
    named = [{"S": 2}, {"S": 1}, {"S": 3}]
    selection = NodeSelection(kinds=["z"], positions=["S", "last"])
    result = run_atp(
        model,
        None,
        clean,
        corrupt,
        lengths,
        METRIC,
        answer,
        wrong,
        selection,
        named_positions=named,
    )
    nodes = result.nodes()
    assert str(nodes[0]) == "z:L0:0@S" and Node.parse(str(nodes[0])) == nodes[0]
    per = result.per_prompt()
    torch.testing.assert_close(result.mean(), per.mean(0))
    torch.testing.assert_close(result.mean_abs(), per.abs().mean(0))
    exact = exact_patch(
        model,
        None,
        clean,
        lengths,
        METRIC,
        answer,
        wrong,
        nodes,
        corrupt_tokens=corrupt,
        named_positions=named,
    )
    layer1 = [i for i, n in enumerate(nodes) if n.layer == 1]
    torch.testing.assert_close(per[:, layer1], exact[:, layer1], atol=1e-9, rtol=0)
    top = result.summary(k=3).top
    assert len(top) == 3 and top[0].mean_abs >= top[1].mean_abs >= top[2].mean_abs


def test_verification_metrics_and_patching_loop():
    truth = torch.tensor([5.0, -4.0, 3.0, 0.1, 0.2, 0.0])
    estimate = torch.tensor([0.1, 4.0, 3.0, 5.0, 0.2, 0.0])
    assert recall_at_k(estimate, truth, 2) == 0.5
    report = verify(estimate, truth, k=3)
    # Estimated order: 3, 1, 2, 4, 0 → the true top-3 {0, 1, 2} are all in after 5 patches.
    assert report.cost_of_verified_recall == 5 and report.found == 3
    assert verify(estimate, truth, k=3, budget=4).cost_of_verified_recall is None
    patched, effects = verify_by_patching(
        estimate, lambda idx: truth[list(idx)][None, :], k=1, budget=6, chunk=1
    )
    # After nodes 3 and 1, the verified top-1 (|−4| at node 1) beats the largest
    # remaining estimate (3.0 at node 2), so the loop stops there.
    assert patched == [3, 1] and torch.equal(effects, truth[[3, 1]].abs())


def test_subset_recalls_rescore_disjoint_prompt_subsets():
    from circuitscan.testing.evaluation import RankingComparison

    # Prompts 0-1 rank node 0 first, prompts 2-3 node 1; the estimate always says node 0.
    truth = torch.tensor([[3.0, 1.0, 0.0], [-3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, -2.0, 1.0]])
    estimate = torch.tensor([[1.0, 0.0, 0.5]] * 4)
    comparison = RankingComparison(
        nodes=[],
        truth=truth.abs().mean(0),
        estimates={"atp": estimate.abs().mean(0)},
        reports={},
        truth_per_prompt=truth,
        estimates_per_prompt={"atp": estimate},
    )
    assert comparison.subset_recalls("atp", 1, 2) == [1.0, 0.0]
    assert comparison.subset_recalls("atp", 2, 2) == [0.5, 0.5]  # the estimate ranks node 2 second
    with pytest.raises(ValueError, match="cannot cut 4 prompts into 5"):
        comparison.subset_recalls("atp", 1, 5)
    # Over all prompts the true top-2 is nodes 0 and 1; the estimate's is 0 and 2.
    assert comparison.misses("atp", 2) == [1]
    assert comparison.misses("atp", 3) == []
