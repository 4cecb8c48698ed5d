"""The top-level API, ``import circuitscan as cs``: lazy, documented by running examples,
and wired to the engine without changing what it computes."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest
import torch

import circuitscan as cs
from circuitscan.pipelines.attribution import certify, exact_patch, run_atp
from circuitscan.pipelines.attribution.errors import PositionError
from circuitscan.pipelines.batching import TokenizationError
from circuitscan.schemas.attribution import AttributionMethod, NodeSelection
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.testing import build_tiny_language_model, build_tiny_sae

API_MODULES = [
    "circuitscan.loading",
    "circuitscan.attribution",
    "circuitscan.caching",
    "circuitscan.stores",
]
CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Tom and Amy had a long day at the park. Amy handed a ring to",
]
CORRUPT = [
    "When Alice and Bob went to the store, Carl gave a drink to",
    "Then, Sam and Kate had a long day at the park. Jane handed a ring to",
]


@pytest.mark.parametrize("name", API_MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    outcome = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted > 0, f"{name} has no examples"
    assert outcome.failed == 0


def test_every_public_function_has_an_example() -> None:
    functions = ["load_model", "load_saes", "attribute", "exact_patch", "certify", "ablation_scan"]
    functions += ["cache", "open_store"]
    missing = [name for name in functions if ">>> " not in (getattr(cs, name).__doc__ or "")]
    assert missing == []


def test_import_is_lazy_from_any_directory(tmp_path) -> None:
    code = (
        "import sys, circuitscan as cs\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'eager import'\n"
        "print(cs.attribute.__module__, 'ray' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert run.stdout.split() == ["circuitscan.attribution", "False"]


def test_unknown_names_fail_and_known_ones_are_listed() -> None:
    with pytest.raises(AttributeError, match="no attribute 'atribute'"):
        _ = cs.atribute  # type: ignore[attr-defined]
    assert {"attribute", "PromptPairs", "open_store"} <= set(dir(cs))
    assert sorted(cs.__all__) == sorted(cs._EXPORTS)  # every export is importable and listed
    assert all(getattr(cs, name) is not None for name in cs.__all__)


def test_method_names_parse() -> None:
    assert AttributionMethod.parse("atpstar") == AttributionMethod(qk_fix=True, graddrop=True)
    assert AttributionMethod.parse("atp+qk") == AttributionMethod(qk_fix=True)
    assert AttributionMethod.parse("ATP+GradDrop") == AttributionMethod(graddrop=True)
    for name in ("atp", "atpstar", "atp_qk", "atp_graddrop"):
        assert AttributionMethod.parse(name).name == name
    assert AttributionMethod.model_validate("atp*").name == "atpstar"
    with pytest.raises(ValueError, match="unknown attribution method 'atpp'"):
        AttributionMethod.parse("atpp")


@pytest.fixture(scope="module")
def model():
    return build_tiny_language_model()


@pytest.fixture(scope="module")
def pairs(model):
    return cs.PromptPairs.from_strings(
        model, CLEAN, CORRUPT, answers=[" Mary", " Tom"], wrong=[" John", " Amy"]
    )


def test_pairs_from_strings_carry_tokens_lengths_and_answers(model, pairs) -> None:
    assert len(pairs) == 2
    assert pairs.lengths.tolist() == [len(model.to_tokens(text)[0]) for text in CLEAN]
    assert pairs.clean[0, : pairs.lengths[0]].tolist() == model.to_tokens(CLEAN[0])[0].tolist()
    assert pairs.corrupt is not None and pairs.corrupt.shape == pairs.clean.shape
    assert pairs.answer is not None and pairs.wrong is not None
    assert model.to_string(pairs.answer) == " Mary Tom"
    assert model.to_string(pairs.wrong) == " John Amy"
    assert pairs.position_map is None


def test_pairs_from_records_and_ioi_keep_named_positions(model) -> None:
    ioi = cs.PromptPairs.from_ioi(model, 4, seed=1)
    assert len(ioi) == 4 and ioi.corrupt is not None
    for row, positions in enumerate(ioi.named_positions):
        assert set(positions) == {"IO", "S1", "S2", "END"}
        assert ioi.clean[row, positions["IO"]] == ioi.answer[row]
        assert ioi.clean[row, positions["S1"]] == ioi.wrong[row]
        assert positions["END"] == ioi.lengths[row] - 1
    records = [{"text": CLEAN[0], "answer": " Mary", "wrong": " John", "positions": {"IO": 2}}]
    one = cs.PromptPairs.from_records(model, records)
    assert one.corrupt is None and one.named_positions == [{"IO": 2}]


def test_pairs_refuse_what_cannot_pair(model) -> None:
    with pytest.raises(TokenizationError, match="2 clean prompts but 1 answers"):
        cs.PromptPairs.from_strings(model, CLEAN, answers=[" Mary"])
    with pytest.raises(TokenizationError, match=r"prompts \[1\] have no corrupted"):
        cs.PromptPairs.from_records(
            model, [{"text": CLEAN[0], "corrupted": CORRUPT[0]}, {"text": CLEAN[1]}]
        )


def test_end_aligned_pairs_patch_a_longer_preamble(model) -> None:
    longer = ["Then, " + CORRUPT[0]]
    pairs = cs.PromptPairs.from_strings(
        model, CLEAN[:1], longer, answers=[" Mary"], wrong=[" John"], align="end"
    )
    assert pairs.position_map is not None
    assert int(pairs.corrupt_lengths[0]) == int(pairs.lengths[0]) + 2
    result = cs.attribute(model, [], pairs, nodes=["z"], positions=["last"])
    assert torch.isfinite(result.per_prompt()).all()
    unaligned = cs.PromptPairs.from_strings(
        model, CLEAN[:1], longer, answers=[" Mary"], wrong=[" John"]
    )
    with pytest.raises(PositionError):
        cs.attribute(model, [], unaligned, nodes=["z"], positions=["last"])


def test_attribute_and_exact_patch_equal_the_engine(model, pairs) -> None:
    saes = [build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre"), seed=3)]
    result = cs.attribute(
        model, saes, pairs, method="atpstar", nodes=["z", "q", "k", "feature"], positions=["last"]
    )
    expected = run_atp(
        model,
        {"L1.resid_pre": saes[0]},
        pairs.clean,
        pairs.corrupt,
        pairs.lengths,
        MetricSpec(),
        pairs.answer,
        pairs.wrong,
        NodeSelection(kinds=["z", "q", "k", "feature"], positions=["last"]),
        method=AttributionMethod(qk_fix=True, graddrop=True),
    )
    assert result.method == "atpstar"
    assert [str(n) for n in result.nodes()] == [str(n) for n in expected.nodes()]
    torch.testing.assert_close(result.per_prompt(), expected.per_prompt(), rtol=0, atol=0)

    top = result.top(4)
    delta = cs.exact_patch(model, saes, pairs, top)
    truth = exact_patch(
        model,
        {"L1.resid_pre": saes[0]},
        pairs.clean,
        pairs.lengths,
        MetricSpec(),
        pairs.answer,
        pairs.wrong,
        [result.nodes()[[str(n) for n in result.nodes()].index(s.node)] for s in top],
        corrupt_tokens=pairs.corrupt,
    )
    torch.testing.assert_close(delta, truth, rtol=0, atol=0)
    assert delta.abs().sum() > 0


def test_certify_bounds_the_unverified_nodes_as_the_engine_does(model, pairs) -> None:
    saes = [build_tiny_sae(model, cs.HookSite.parse("L1.resid_pre"), seed=3)]
    result = cs.attribute(model, saes, pairs, nodes=["z", "feature"], positions=["last"])
    top = result.top(4)
    bound = cs.certify(model, saes, pairs, result.nodes(), verified=top, samples=12, p=0.5)
    verified = {score.node for score in top}
    unverified = [node for node in result.nodes() if str(node) not in verified]
    expected = certify(
        model,
        {"L1.resid_pre": saes[0]},
        pairs.clean,
        pairs.lengths,
        MetricSpec(),
        pairs.answer,
        pairs.wrong,
        unverified,
        samples=12,
        p=0.5,
        corrupt_tokens=pairs.corrupt,
    )
    assert bound == expected
    assert bound.n_nodes == len(result.nodes()) - 4
    assert not verified & {node.node for node in bound.nodes}


def test_cache_reads_each_sae_at_its_own_site(model, pairs) -> None:
    sites = [cs.HookSite.parse("L0.resid_post"), cs.HookSite.parse("L1.z")]
    saes = [build_tiny_sae(model, site, seed=i) for i, site in enumerate(sites)]
    caches = cs.cache(model, saes, pairs, gradients=False)
    assert sorted(caches) == ["L0.resid_post", "L1.z"]
    assert all(
        c.gradients is None and c.n_tokens == int(pairs.lengths.sum()) for c in caches.values()
    )
    scans = cs.ablation_scan(model, saes[:1], pairs, positions=["last"])
    assert list(scans) == ["L0.resid_post"]
    assert scans["L0.resid_post"].delta.shape[0] == len(pairs)


def test_store_view_reads_what_was_cached(model, pairs) -> None:
    from circuitscan.services.store import drop_memory_store
    from circuitscan.services.store.results import ResultNotFoundError
    from circuitscan.testing import write_tiny_store

    sites = [cs.HookSite.parse("L0.resid_post"), cs.HookSite.parse("L1.z")]
    saes = [build_tiny_sae(model, site, seed=i) for i, site in enumerate(sites)]
    records = [
        {"text": text, "answer": answer, "wrong": wrong}
        for text, answer, wrong in zip(CLEAN, [" Mary", " Tom"], [" John", " Amy"], strict=True)
    ]
    url = write_tiny_store("memory://test-store-view", model, saes, records, shard_size=1)
    try:
        store = cs.open_store(url)
        assert store.sites == ["L0.resid_post", "L1.z"] and store.n_prompts == 2
        assert store.prompt_tokens(1) == pairs.clean[1, : pairs.lengths[1]].tolist()
        with pytest.raises(ValueError, match="choose one with site="):
            store.features_at(0, 3)
        cached = cs.cache(model, saes, pairs)["L1.z"].dense().float()
        first = int(pairs.lengths[0])
        dense = store.dense(1, site="L1.z")
        assert dense.shape == (int(pairs.lengths[1]), saes[1].cfg.d_sae)
        torch.testing.assert_close(dense, cached[first:], atol=2e-3, rtol=2e-3)  # float16 store
        active = store.features_at(1, 4, site="L1.z", sort_by="activation")
        expected = cached[first + 4].nonzero().flatten().tolist()
        assert sorted(active.feature_ids) == expected
        assert active.activations == sorted(active.activations, reverse=True)
        feature = active.feature_ids[0]
        hits = store.top_examples(feature, site="L1.z", n=2)
        assert hits and hits[0].activation == max(h.activation for h in hits)
        assert store.summary(feature, site="L1.z").count == int((cached[:, feature] != 0).sum())
        with pytest.raises(ResultNotFoundError):
            store.result()
    finally:
        drop_memory_store(url)
