"""The node-kind table: every kind goes job spec → engine → node names → exact patching.

Each row of ``schemas/node_kinds.py`` is validated in an attribute job spec
(by name and by its older alias), translated to the engine's node selection
by the job code, scored by AtP on a tiny float64 model, and its node names
parse back to the same nodes and are patched exactly. On the models below
the path from each kind's last-layer nodes to the logits is linear (QK fix
for queries and keys), so AtP must equal exact patching to rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from circuitscan.pipelines.attribution import exact_patch, run_atp
from circuitscan.pipelines.attribution.node_kinds import NODE_KIND_OPS
from circuitscan.schemas.attribution import AttributionMethod, Node, NodeSelection
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.jobs import AttributeParams, JobSpec
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.node_kinds import NODE_KINDS, NodeKind, node_kind
from circuitscan.services.jobs.kinds.attribute.worker import node_selection
from circuitscan.services.jobs.spec_io import load_spec
from circuitscan.testing import build_tiny_model, build_tiny_sae

ROOT = Path(__file__).resolve().parents[2]
METRIC = MetricSpec()
SAE_SITE = HookSite(layer=1, point="z")


def _spec(nodes: list[str], **job: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "prompts": {"kind": "ioi", "n": 4, "seed": 0},
            "saes": [{"source": "default/L15.z"}],
            "job": {"kind": "attribute", "nodes": nodes, **job},
            "store": "memory://node-kinds",
        }
    )


def _spellings(name: NodeKind) -> list[str]:
    alias = NODE_KINDS[name].alias
    return [name] if alias is None else [name, alias]


def test_the_engine_has_a_row_for_every_kind_and_nothing_else() -> None:
    assert set(NODE_KIND_OPS) == set(NODE_KINDS)
    for name, row in NODE_KIND_OPS.items():
        assert row.spec is NODE_KINDS[name]


@pytest.mark.parametrize("name", list(NODE_KINDS))
def test_every_kind_is_selectable_in_a_job_by_name_and_alias(name: NodeKind) -> None:
    for spelling in _spellings(name):
        params = _spec([spelling]).job
        assert isinstance(params, AttributeParams)
        assert params.node_kinds == [name]
        assert node_selection(params).kinds == [name]
        # The spec keeps what was written: its hash (and so resuming its store) is unchanged.
        assert params.model_dump()["nodes"] == [spelling]


@pytest.mark.parametrize("path", ["examples/ioi_attribute.yaml", "deploy/specs/ioi-atpstar.yaml"])
def test_shipped_specs_in_older_spellings_mean_the_same_kinds(path: str) -> None:
    params = load_spec(ROOT / path).job
    assert isinstance(params, AttributeParams)
    assert sorted(params.node_kinds) == ["feature", "k", "q", "v", "z"]


def test_aliases_and_names_mix_and_repeats_collapse() -> None:
    params = AttributeParams(kind="attribute", nodes=["head_z", "z", "mlp", "sae_feature"])
    assert params.node_kinds == ["z", "mlp", "feature"]


def test_unknown_kinds_are_refused_at_the_spec_and_in_node_names() -> None:
    with pytest.raises(ValueError, match="nodes"):
        _spec(["head_o"])
    with pytest.raises(UserInputError, match="unknown node kind 'head_o'"):
        node_kind("head_o")
    with pytest.raises(UserInputError, match="unknown node kind 'head_o'"):
        Node.parse("head_o:L1:0@3")
    # Node names in results use kind names only; an alias there is a typo, said plainly.
    with pytest.raises(UserInputError, match="'head_z' is a job-spec spelling; node names write"):
        Node.parse("head_z:L1:0@3")


def _without_saes(nodes: list[str]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "prompts": {"kind": "ioi", "n": 4},
            "job": {"kind": "attribute", "nodes": nodes},
            "store": "memory://x",
        }
    )


def test_sae_kinds_need_an_sae_by_either_spelling() -> None:
    for spelling in ("sae_feature", "feature", "sae_error"):
        with pytest.raises(ValueError, match=rf"\['{spelling}'\] need at least one SAE"):
            _without_saes([spelling])
    others = [n for n, spec in NODE_KINDS.items() if not spec.sae]
    assert isinstance(_without_saes(others).job, AttributeParams)


def test_older_specs_keep_their_content_hash() -> None:
    """Hashes computed before kinds had one table: a store written then still resumes."""
    spec = _spec(["head_z", "head_q", "head_k", "head_v", "sae_feature", "mlp_neuron", "sae_error"])
    assert spec.content_hash() == "8c6ab881eceea2d7"
    default = JobSpec.model_validate(
        {
            "prompts": {"kind": "ioi", "n": 4, "seed": 0},
            "saes": [{"source": "default/L15.z"}],
            "job": {"kind": "attribute"},
            "store": "memory://x",
        }
    )
    assert default.content_hash() == "382de7a6ab1545bf"


def _pair(batch: int = 3, seq: int = 7, vocab: int = 40):
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (batch, seq), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, vocab, (batch,), generator=generator)
    lengths = torch.tensor([seq, seq - 1, seq - 2])
    return clean, corrupt, lengths, torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])


def _linear_setup(name: NodeKind):
    """A model on which the kind's last-layer nodes reach the logits linearly, and its SAEs."""
    spec = NODE_KINDS[name]
    if spec.needs_mlp:  # mlp_post of the last layer → W_out → logits, no final norm
        return build_tiny_model(normalization=None), None
    model = build_tiny_model(normalization=None, attn_only=True, n_key_value_heads=2)
    return model, [build_tiny_sae(model, SAE_SITE)]


@pytest.mark.parametrize("name", list(NODE_KINDS))
def test_every_kind_round_trips_spec_to_engine_to_node_names(name: NodeKind) -> None:
    spec = NODE_KINDS[name]
    params = _spec([_spellings(name)[-1]]).job
    assert isinstance(params, AttributeParams)
    model, saes = _linear_setup(name)
    selection: NodeSelection = node_selection(params).model_copy(update={"layers": [1]})
    clean, corrupt, lengths, answer, wrong = _pair()
    method = AttributionMethod(qk_fix=spec.qk_fix is not None)
    result = run_atp(
        model, saes, clean, corrupt, lengths, METRIC, answer, wrong, selection, method=method
    )
    nodes = result.nodes()
    names = [str(node) for node in nodes]
    assert nodes and all(n.startswith(f"{name}:L1") for n in names)
    assert [Node.parse(n) for n in names] == nodes
    assert all(node.site.point == (spec.point or SAE_SITE.point) for node in nodes)
    units = {node.index for node in nodes}
    if spec.indexed:
        sae = saes[0] if saes else None
        assert units == set(range(NODE_KIND_OPS[name].n_units(model, sae)))
    else:
        assert units == {None}
    exact = exact_patch(
        model, saes, clean, lengths, METRIC, answer, wrong, nodes, corrupt_tokens=corrupt
    )
    assert float(exact.nan_to_num(0).abs().max()) > 1e-3  # the patches do something
    torch.testing.assert_close(result.per_prompt(), exact, atol=1e-9, rtol=0, equal_nan=True)


def test_mlp_job_matches_exact_patching_and_zero_ablation() -> None:
    """An ``mlp`` attribute job, end to end through the job's translation, on every layer.

    Only the last layer is linear to the logits; earlier layers' AtP is a
    first-order estimate, so there it is checked against a finite-difference
    derivative of exact patching (``fraction`` → 0), which it must equal.
    """
    params = _spec(["mlp"], positions="last").job
    assert isinstance(params, AttributeParams)
    model = build_tiny_model(normalization=None)
    clean, corrupt, lengths, answer, wrong = _pair()
    result = run_atp(
        model, None, clean, corrupt, lengths, METRIC, answer, wrong, node_selection(params)
    )
    nodes = result.nodes()
    assert [str(n) for n in nodes] == ["mlp:L0@last", "mlp:L1@last"]
    args = (model, None, clean, lengths, METRIC, answer, wrong, nodes)
    exact = exact_patch(*args, corrupt_tokens=corrupt)
    torch.testing.assert_close(result.per_prompt()[:, 1], exact[:, 1], atol=1e-9, rtol=0)
    step = 1e-6
    slope = exact_patch(*args, corrupt_tokens=corrupt, fraction=step) / step
    torch.testing.assert_close(result.per_prompt(), slope, atol=1e-4, rtol=1e-4)
    # Zero ablation of a whole MLP layer: the same machinery with a zero patch value.
    zero = exact_patch(*args, mode="zero")
    baseline = run_atp(
        model, None, clean, None, lengths, METRIC, answer, wrong, node_selection(params)
    )
    torch.testing.assert_close(baseline.per_prompt()[:, 1], zero[:, 1], atol=1e-9, rtol=0)
