"""Bad input to the attribution engine fails early with an error that names the problem."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.attribution import (
    AttributionInputError,
    MissingSAEError,
    NodeSelectionError,
    PositionError,
    ablation_scan,
    exact_patch,
    run_atp,
)
from circuitscan.pipelines.attribution.inputs import AnswerTokenError
from circuitscan.schemas.attribution import Node, NodeSelection
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model, build_tiny_sae

METRIC = MetricSpec()
SITE = HookSite(layer=1, point="z")


@pytest.fixture(scope="module")
def setup():
    model = build_tiny_model(normalization=None, attn_only=True)
    saes = {SITE: build_tiny_sae(model, SITE)}
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 40, (2, 6), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, 40, (2,), generator=generator)
    lengths = torch.tensor([6, 5])
    return model, saes, clean, corrupt, lengths, torch.tensor([1, 2]), torch.tensor([3, 4])


def _atp(setup, selection, **kwargs):
    """run_atp on the fixture's prompts; keyword arguments override its inputs."""
    model, saes, clean, corrupt, lengths, answer, wrong = setup
    return run_atp(
        model,
        kwargs.pop("saes", saes),
        clean,
        kwargs.pop("corrupt_tokens", corrupt),
        lengths,
        METRIC,
        kwargs.pop("answer", answer),
        kwargs.pop("wrong", wrong),
        selection,
        **kwargs,
    )


def _patch(setup, nodes, **kwargs):
    model, saes, clean, corrupt, lengths, answer, wrong = setup
    kwargs.setdefault("corrupt_tokens", corrupt)
    return exact_patch(
        model,
        kwargs.pop("saes", saes),
        clean,
        lengths,
        METRIC,
        kwargs.pop("answer", answer),
        kwargs.pop("wrong", wrong),
        nodes,
        **kwargs,
    )


Z = NodeSelection(kinds=["z"])


@pytest.fixture(scope="module")
def tokenized():
    """A tiny model whose vocabulary is the default tokenizer's, so strings can be answers."""
    from circuitscan.services.model_loading import load_tokenizer

    tokenizer = load_tokenizer()
    model = build_tiny_model(normalization=None, attn_only=True, d_vocab=len(tokenizer))
    model.tokenizer = tokenizer
    clean = torch.tensor([tokenizer.encode("When Mary and John went", add_special_tokens=False)])
    return model, clean, torch.tensor([clean.shape[1]])


def test_answer_strings_must_be_single_tokens(tokenized):
    model, clean, lengths = tokenized
    corrupt = clean.flip(1)
    selection = NodeSelection(kinds=["z"], positions="last")
    ok = run_atp(model, None, clean, corrupt, lengths, METRIC, [" Mary"], [" John"], selection)
    ids = torch.tensor(
        [model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (" Mary", " John")]
    )
    by_id = run_atp(model, None, clean, corrupt, lengths, METRIC, ids[:1], ids[1:], selection)
    torch.testing.assert_close(ok.per_prompt(), by_id.per_prompt())
    with pytest.raises(
        AnswerTokenError, match=r"answer of prompt 0: ' Marylebone Road' is \d+ tokens"
    ):
        run_atp(
            model, None, clean, corrupt, lengths, METRIC, [" Marylebone Road"], [" John"], selection
        )
    with pytest.raises(AnswerTokenError, match=r"wrong of prompt 0.*leading space"):
        exact_patch(
            model, None, clean, lengths, METRIC, [" Mary"], ["Johnathan Smith"],
            [Node(kind="z", layer=0, index=0, position=1)], corrupt_tokens=corrupt,
        )  # fmt: skip
    with pytest.raises(AnswerTokenError, match="one string per prompt"):
        run_atp(model, None, clean, corrupt, lengths, METRIC, " Mary", [" John"], selection)


@pytest.mark.unchecked_types  # wrong inputs on purpose: the functions' own messages
def test_answer_ids_are_checked(setup):
    with pytest.raises(AnswerTokenError, match="one token id per prompt"):
        _atp(setup, Z, answer=torch.tensor([1, 2, 3]))
    with pytest.raises(AnswerTokenError, match=r"not all in 0\.\.39"):
        _atp(setup, Z, wrong=torch.tensor([3, 400]))
    with pytest.raises(AnswerTokenError, match="logit_diff needs wrong tokens"):
        _patch(setup, [Node(kind="z", layer=0, index=0, position=1)], wrong=None)


def test_clean_and_corrupted_prompts_must_align(setup):
    corrupt = setup[3]
    with pytest.raises(PositionError, match=r"prompt 1 have different token lengths \(5 vs 6\)"):
        _atp(setup, Z, corrupt_lengths=torch.tensor([6, 6]))
    with pytest.raises(PositionError, match=r"different token lengths.*explicit position map"):
        _patch(
            setup,
            [Node(kind="z", layer=0, index=0, position=1)],
            corrupt_lengths=torch.tensor([6, 4]),
        )
    longer = torch.cat([corrupt, corrupt[:, :2]], dim=1)
    with pytest.raises(PositionError, match=r"\(2, 6\) and corrupted tokens \(2, 8\) differ"):
        _atp(setup, Z, corrupt_tokens=longer)


def test_hook_site_without_sae(setup):
    model, saes, clean, _, lengths, answer, wrong = setup
    with pytest.raises(MissingSAEError, match=r"no SAE at hook site L0\.z"):
        _atp(setup, NodeSelection(kinds=["feature"], sae_sites=["L0.z"]))
    with pytest.raises(MissingSAEError, match="feature nodes need at least one SAE"):
        _atp(setup, NodeSelection(kinds=["feature"]), saes=None)
    node = Node(kind="feature", layer=0, point="resid_pre", index=3, position=2)
    with pytest.raises(
        MissingSAEError, match=r"feature:L0\.resid_pre:3@2 needs an SAE at L0\.resid_pre"
    ):
        _patch(setup, [node])
    with pytest.raises(MissingSAEError, match=r"reads blocks\.1\.attn\.hook_z.*no SAE at L0\.z"):
        ablation_scan(
            model, saes[SITE], HookSite(layer=0, point="z"), clean, lengths, METRIC, answer, wrong
        )


def test_positions_out_of_range(setup):
    model, saes, clean, _, lengths, answer, wrong = setup
    with pytest.raises(PositionError, match="position 5 is out of range for prompt 1 of length 5"):
        _atp(setup, NodeSelection(kinds=["z"], positions=[5]))
    with pytest.raises(PositionError, match="prompt 0 has no named position 'IO'"):
        _atp(setup, NodeSelection(kinds=["z"], positions=["IO"]), named_positions=[{}, {}])
    with pytest.raises(PositionError, match="named position 'IO'=9 is out of range for prompt 1"):
        _atp(
            setup,
            NodeSelection(kinds=["z"], positions=["IO"]),
            named_positions=[{"IO": 1}, {"IO": 9}],
        )
    with pytest.raises(
        PositionError, match=r"z:L0:1@7 is at position 7, out of range for every prompt"
    ):
        _patch(setup, [Node(kind="z", layer=0, index=1, position=7)])
    with pytest.raises(PositionError, match="position 6 is out of range"):
        ablation_scan(model, saes[SITE], SITE, clean, lengths, METRIC, answer, wrong, positions=[6])
    with pytest.raises(ValueError, match="position must be >= 0"):
        Node(kind="z", layer=0, index=1, position=-1)


@pytest.mark.unchecked_types  # wrong inputs on purpose: the functions' own messages
def test_empty_or_impossible_node_selections(setup):
    with pytest.raises(NodeSelectionError, match="no kinds"):
        _atp(setup, NodeSelection(kinds=[]))
    with pytest.raises(NodeSelectionError, match="no positions"):
        _atp(setup, NodeSelection(kinds=["z"], positions=[]))
    with pytest.raises(NodeSelectionError, match="empty layer list"):
        _atp(setup, NodeSelection(kinds=["z"], layers=[]))
    with pytest.raises(NodeSelectionError, match="features list is empty"):
        _atp(setup, NodeSelection(kinds=["feature"], features=[]))
    with pytest.raises(NodeSelectionError, match="heads list is empty"):
        _atp(setup, NodeSelection(kinds=["z"], heads=[]))
    with pytest.raises(NodeSelectionError, match="layer 7 does not exist"):
        _atp(setup, NodeSelection(kinds=["z"], layers=[7]))
    with pytest.raises(NodeSelectionError, match="node list is empty"):
        _patch(setup, [])
    with pytest.raises(NodeSelectionError, match=r"z:L1:9@2: index 9 does not exist \(4 z units"):
        _patch(setup, [Node(kind="z", layer=1, index=9, position=2)])
    with pytest.raises(NodeSelectionError, match="attention-only"):
        _patch(setup, [Node(kind="neuron", layer=1, index=0, position=2)])
    with pytest.raises(AttributionInputError, match="unknown ablation mode 'drop'"):
        model, saes, clean, _, lengths, answer, wrong = setup
        ablation_scan(model, saes[SITE], SITE, clean, lengths, METRIC, answer, wrong, mode="drop")


@pytest.mark.unchecked_types  # wrong inputs on purpose: the functions' own messages
def test_position_maps_are_checked(setup):
    corrupt = setup[3]
    longer = torch.cat([corrupt, corrupt[:, :2]], dim=1)
    longer_lengths = torch.tensor([8, 7])
    good = torch.arange(6).expand(2, 6).clone()
    with pytest.raises(PositionError, match=r"like the clean tokens \(2, 6\), got \(2, 5\)"):
        _atp(setup, Z, corrupt_tokens=longer, corrupt_lengths=longer_lengths,
             position_map=good[:, :5])  # fmt: skip
    bad = good.clone()
    bad[1, 3] = 7
    with pytest.raises(PositionError, match=r"prompt 1 position 3 maps to 7, outside"):
        _atp(setup, Z, corrupt_tokens=longer, corrupt_lengths=longer_lengths, position_map=bad)
    with pytest.raises(AttributionInputError, match="position map needs corrupted prompts"):
        _atp(setup, Z, corrupt_tokens=None, position_map=good)
    _atp(setup, Z, corrupt_tokens=longer, corrupt_lengths=longer_lengths, position_map=good)
