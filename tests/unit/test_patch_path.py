"""patch_path on a tiny float64 model: each of its rows is the intervention it names."""

from __future__ import annotations

import pytest
import torch

from circuitscan.pipelines.attribution import (
    AttributionInputError,
    NodeSelectionError,
    exact_patch,
    patch_path,
    run_atp,
)
from circuitscan.schemas.attribution import AttributionMethod, Node, NodeSelection
from circuitscan.schemas.hooks import HookSite
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_model, build_tiny_sae

METRIC = MetricSpec()
SITE = HookSite(layer=0, point="resid_post")


@pytest.fixture
def case():
    model = build_tiny_model(normalization="LN")
    sae = build_tiny_sae(model, SITE, seed=4)
    generator = torch.Generator().manual_seed(11)
    clean = torch.randint(0, 40, (3, 6), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(0, 40, (3, 3), generator=generator)
    lengths = torch.tensor([6, 5, 6])
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    named = [{"X": 2}, {"X": 3}, {"X": 1}]
    return model, {SITE: sae}, clean, corrupt, lengths, answer, wrong, named


def test_each_row_is_the_intervention_it_names(case):
    model, saes, clean, corrupt, lengths, answer, wrong, named = case
    with torch.no_grad():
        acts = saes[SITE].encode(model.run_with_cache(clean)[1][SITE.hook_name])
    feature = int(acts[:, 2].sum(0).argmax())  # active at position 2 of some prompt
    nodes = [
        Node(kind="v", layer=0, index=1, position="X"),
        Node(kind="z", layer=1, index=3, position=4),
        Node(kind="z", layer=1, index=1, position=4),  # scored in the same run_atp as head 3
        Node(kind="feature", layer=0, point="resid_post", index=feature, position=2),
    ]
    args = (model, saes, clean, corrupt, lengths, METRIC, answer, wrong, nodes)
    path = patch_path(*args, named_positions=named, fractions=[1.0, 0.25])
    patch = (model, saes, clean, lengths, METRIC, answer, wrong, nodes)
    kwargs = {"corrupt_tokens": corrupt, "named_positions": named}
    exact = exact_patch(*patch, **kwargs)
    torch.testing.assert_close(path.exact, exact, equal_nan=True)
    torch.testing.assert_close(
        path.frozen, exact_patch(*patch, **kwargs, freeze_later_patterns=True), equal_nan=True
    )
    assert path.fractions == [0.25, 1.0]
    torch.testing.assert_close(path.partial[1], exact, equal_nan=True)  # f = 1 is the patch
    torch.testing.assert_close(
        path.partial[0], exact_patch(*patch, **kwargs, fraction=0.25) / 0.25, equal_nan=True
    )
    assert float(path.exact[:, 2].abs().max()) > 0  # the feature node is active somewhere
    for name, method in {
        "atp": AttributionMethod(),
        "atpstar": AttributionMethod(qk_fix=True, graddrop=True),
    }.items():
        full = run_atp(
            model, saes, clean, corrupt, lengths, METRIC, answer, wrong,
            NodeSelection(kinds=["v", "z", "feature"], positions="all"),
            method=method, named_positions=named,
        )  # fmt: skip
        names = [str(n) for n in full.nodes()]
        signed, score = full.per_prompt_signed(), full.per_prompt()
        for column, node in enumerate(nodes):
            if node.position == "X":  # 'all' positions are absolute: compare prompt by prompt
                at = [names.index(str(node.model_copy(update={"position": p["X"]})))
                      for p in named]  # fmt: skip
                want_signed = torch.stack([signed[b, i] for b, i in enumerate(at)])
                want_score = torch.stack([score[b, i] for b, i in enumerate(at)])
            else:
                i = names.index(str(node))
                want_signed, want_score = signed[:, i], score[:, i]
            torch.testing.assert_close(path.estimates[name][:, column], want_signed, equal_nan=True)
            torch.testing.assert_close(path.scores[name][:, column], want_score, equal_nan=True)
    flips = (torch.sign(path.partial[0]) * torch.sign(path.exact) < 0).sum(0)
    assert torch.equal(path.sign_changes(), flips)


def test_bad_requests_are_clear_errors(case):
    model, saes, clean, corrupt, lengths, answer, wrong, _ = case
    args = (model, saes, clean, corrupt, lengths, METRIC, answer, wrong)
    node = Node(kind="z", layer=0, index=0, position=1)
    with pytest.raises(NodeSelectionError, match="node list is empty"):
        patch_path(*args, [])
    with pytest.raises(AttributionInputError, match=r"fractions must lie in \(0, 1\]"):
        patch_path(*args, [node], fractions=[0.0, 0.5])
    with pytest.raises(AttributionInputError, match="position 5 is out of range for prompt 1"):
        patch_path(*args, [Node(kind="z", layer=0, index=0, position=5)])
    with pytest.raises(AttributionInputError, match="layer 7"):
        patch_path(*args, [Node(kind="z", layer=7, index=0, position=1)])
