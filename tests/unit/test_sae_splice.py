"""One splice path: no pipeline detaches an SAE the caller attached, and each leaves the model
exactly as it found it.

Every public pipeline function that runs the model is called twice: on a model
where the caller has attached SAEs of their own (one without its error term,
so it changes the output, and the very SAE the pipeline is given, with it),
where it must refuse with a message saying what to do and leave those SAEs
attached with their settings; and on the bare model, where it must run and
leave no SAE and no hook behind. After each call the model's logits must be
bit-identical to those before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer

from circuitscan.pipelines.analyses import (
    dfa,
    feature_attributions,
    frozen_norm_scales,
    qk_feature_pairs,
    recursive_dfa,
    reference_means,
    splice_eval,
)
from circuitscan.pipelines.attribution import (
    ablation_scan,
    exact_patch,
    feature_attribution,
    patch_path,
    run_atp,
)
from circuitscan.pipelines.caching import cache_batch
from circuitscan.pipelines.sae_splice import SpliceError, saes_by_hook, spliced
from circuitscan.schemas.attribution import AttributionMethod, Node, NodeSelection
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing.tiny_models import build_tiny_model, build_tiny_sae

METRIC = MetricSpec()
Z1 = HookSite(layer=1, point="z")
RESID1 = HookSite(layer=1, point="resid_pre")
USER_SITE = HookSite(layer=0, point="resid_post")


class Setup:
    """A tiny model, the SAEs pipelines are given, and a batch of prompt pairs."""

    def __init__(self) -> None:
        self.model = build_tiny_model(n_layers=2, normalization="LN")
        self.z_sae = build_tiny_sae(self.model, Z1, seed=1)
        self.resid_sae = build_tiny_sae(self.model, RESID1, seed=2)
        self.saes = [self.z_sae, self.resid_sae]
        # The caller's own SAE, at a site no pipeline here is given.
        self.user_sae = build_tiny_sae(self.model, USER_SITE, seed=3)
        generator = torch.Generator().manual_seed(5)
        self.clean = torch.randint(0, 40, (2, 6), generator=generator)
        self.corrupt = self.clean.clone()
        self.corrupt[:, 2] = torch.randint(0, 40, (2,), generator=generator)
        self.lengths = torch.full((2,), 6)
        self.answer = torch.tensor([1, 2])
        self.wrong = torch.tensor([3, 4])
        with torch.no_grad():
            self.bare_logits = self.model(self.clean)


@pytest.fixture
def setup() -> Setup:
    return Setup()


def _pair_args(s: Setup) -> tuple[Any, ...]:
    return (s.clean, s.corrupt, s.lengths, METRIC, s.answer, s.wrong)


def _prompt_args(s: Setup) -> tuple[Any, ...]:
    return (s.clean, s.lengths, METRIC, s.answer, s.wrong)


Z_NODE = Node(kind="z", layer=1, index=0, position=5)

# Every public pipeline function that runs the model, on a Setup.
PIPELINES: dict[str, Callable[[Setup], object]] = {
    "cache_batch": lambda s: cache_batch(
        s.model, s.saes, s.clean, s.lengths, METRIC, answer=s.answer, wrong=s.wrong
    ),
    "cache_batch_forward_only": lambda s: cache_batch(
        s.model, s.saes, s.clean, s.lengths, None, gradients=False
    ),
    "run_atp": lambda s: run_atp(
        s.model,
        s.saes,
        *_pair_args(s),
        NodeSelection(kinds=["z", "q", "k", "feature", "sae_error"], layers=[1]),
        method=AttributionMethod(qk_fix=True, graddrop=True),
    ),
    "feature_attribution": lambda s: feature_attribution(s.model, s.saes, *_prompt_args(s)),
    "exact_patch": lambda s: exact_patch(
        s.model, s.saes, *_prompt_args(s), [Z_NODE], corrupt_tokens=s.corrupt
    ),
    "patch_path": lambda s: patch_path(s.model, s.saes, *_pair_args(s), [Z_NODE]),
    "ablation_scan": lambda s: ablation_scan(s.model, s.z_sae, Z1, *_prompt_args(s)),
    "splice_eval": lambda s: splice_eval(
        s.model, s.saes, *_prompt_args(s), reference_tokens=s.clean, reference_lengths=s.lengths
    ),
    "reference_means": lambda s: reference_means(s.model, s.saes, s.clean, s.lengths),
    "feature_attributions": lambda s: feature_attributions(
        s.model, s.resid_sae, s.clean, s.lengths, s.lengths - 1, METRIC, s.answer, s.wrong
    ),
    "dfa": lambda s: dfa(s.model, s.saes, s.clean[0], 0, 1, 5),
    "recursive_dfa": lambda s: recursive_dfa(s.model, s.saes, s.clean[0], 0, 1, 5),
    "qk_feature_pairs": lambda s: qk_feature_pairs(s.model, s.resid_sae, s.clean[0], 1, 0, 5, 2),
    "frozen_norm_scales": lambda s: frozen_norm_scales(s.model, s.clean[0], 2, 5),
}


def _logits(model: HookedSAETransformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def _error_terms(model: HookedSAETransformer) -> dict[str, bool]:
    """Each attached SAE's error-term setting (sae_lens 6 keeps it on the hook's wrapper)."""
    return {hook: model._acts_to_saes[hook].use_error_term for hook in model.acts_to_saes}


def _hooks_left(model: HookedSAETransformer) -> list[str]:
    return [name for name, point in model.hook_dict.items() if point.fwd_hooks or point.bwd_hooks]


def _attach_callers_saes(s: Setup) -> dict[str, SAE[Any]]:
    """The caller's SAE without its error term, and the pipelines' own z SAE with it."""
    s.model.add_sae(s.user_sae, use_error_term=False)
    s.model.add_sae(s.z_sae, use_error_term=True)
    return {USER_SITE.hook_name: s.user_sae, Z1.hook_name: s.z_sae}


@pytest.mark.parametrize("name", PIPELINES)
def test_refuses_a_model_with_callers_saes_and_leaves_them_attached(setup, name) -> None:
    attached = _attach_callers_saes(setup)
    before = _logits(setup.model, setup.clean)
    assert (before - setup.bare_logits).abs().max() > 1e-3  # the caller's SAE matters
    with pytest.raises(ValueError, match=r"detach SAEs from the model \(reset_saes\) before"):
        PIPELINES[name](setup)
    now = setup.model.acts_to_saes
    assert now.keys() == attached.keys()
    assert all(now[hook] is sae for hook, sae in attached.items())
    assert _error_terms(setup.model) == {USER_SITE.hook_name: False, Z1.hook_name: True}
    assert torch.equal(_logits(setup.model, setup.clean), before)


@pytest.mark.parametrize("name", PIPELINES)
def test_runs_on_the_bare_model_and_leaves_it_as_it_was(setup, name) -> None:
    before = _logits(setup.model, setup.clean)
    flags = [p.requires_grad for p in setup.model.parameters()]
    PIPELINES[name](setup)
    assert setup.model.acts_to_saes == {}
    assert _hooks_left(setup.model) == []
    assert [p.requires_grad for p in setup.model.parameters()] == flags
    assert torch.equal(_logits(setup.model, setup.clean), before)


def test_cache_batch_no_longer_removes_the_callers_sae(setup) -> None:
    """cache_batch used to end with model.reset_saes(), dropping every SAE the caller had."""
    setup.model.add_sae(setup.user_sae, use_error_term=False)
    before = _logits(setup.model, setup.clean)
    with pytest.raises(SpliceError, match=r"SAEs are attached at \['blocks\.0\.hook_resid_post'\]"):
        cache_batch(setup.model, [setup.z_sae], setup.clean, setup.lengths, None, gradients=False)
    assert setup.model.acts_to_saes == {USER_SITE.hook_name: setup.user_sae}
    assert _error_terms(setup.model) == {USER_SITE.hook_name: False}
    assert torch.equal(_logits(setup.model, setup.clean), before)


def test_spliced_leaves_the_callers_saes_at_other_hooks(setup) -> None:
    setup.model.add_sae(setup.user_sae, use_error_term=False)
    before = _logits(setup.model, setup.clean)
    with spliced(setup.model, [setup.z_sae, setup.resid_sae], use_error_term=False) as model:
        assert model.acts_to_saes.keys() == {USER_SITE.hook_name, Z1.hook_name, RESID1.hook_name}
        assert set(_error_terms(model).values()) == {False}
        assert not torch.equal(_logits(model, setup.clean), before)
    assert setup.model.acts_to_saes == {USER_SITE.hook_name: setup.user_sae}
    assert _error_terms(setup.model) == {USER_SITE.hook_name: False}
    assert torch.equal(_logits(setup.model, setup.clean), before)


def test_spliced_replace_puts_the_callers_sae_back_with_its_setting(setup) -> None:
    setup.model.add_sae(setup.user_sae, use_error_term=False)
    before = _logits(setup.model, setup.clean)
    other = build_tiny_sae(setup.model, USER_SITE, seed=7)
    with pytest.raises(SpliceError, match="already spliced"), spliced(setup.model, [other]):
        pass
    with spliced(setup.model, [other], replace=True) as model:
        assert model.acts_to_saes == {USER_SITE.hook_name: other}
        assert _error_terms(model) == {USER_SITE.hook_name: True}
        # With its error term, the swapped-in SAE leaves the model's own output.
        kept = _logits(model, setup.clean)
        assert (kept - setup.bare_logits).abs().max() < 1e-10
    assert setup.model.acts_to_saes == {USER_SITE.hook_name: setup.user_sae}
    assert _error_terms(setup.model) == {USER_SITE.hook_name: False}
    assert torch.equal(_logits(setup.model, setup.clean), before)


def test_spliced_restores_on_error(setup) -> None:
    setup.model.add_sae(setup.user_sae, use_error_term=False)
    with pytest.raises(RuntimeError, match="boom"), spliced(setup.model, [setup.z_sae]):
        raise RuntimeError("boom")
    assert setup.model.acts_to_saes == {USER_SITE.hook_name: setup.user_sae}
    assert _error_terms(setup.model) == {USER_SITE.hook_name: False}


def test_saes_as_a_sequence_or_the_older_mapping(setup) -> None:
    by_hook = {Z1.hook_name: setup.z_sae, RESID1.hook_name: setup.resid_sae}
    assert saes_by_hook(setup.saes) == by_hook
    assert saes_by_hook({"L1.z": setup.z_sae, RESID1: setup.resid_sae}) == by_hook
    with pytest.raises(SpliceError, match=r"reads blocks\.1\.attn\.hook_z, not blocks\.0"):
        saes_by_hook({"L0.z": setup.z_sae})
    with pytest.raises(SpliceError, match="more than one SAE"):
        saes_by_hook([setup.z_sae, setup.z_sae])
    selection = NodeSelection(kinds=["feature", "sae_error"], layers=[1])
    as_list = run_atp(setup.model, setup.saes, *_pair_args(setup), selection)
    as_map = run_atp(setup.model, {"L1.z": setup.z_sae, "L1.resid_pre": setup.resid_sae},
                     *_pair_args(setup), selection)  # fmt: skip
    torch.testing.assert_close(as_list.per_prompt(), as_map.per_prompt(), rtol=0, atol=0)
