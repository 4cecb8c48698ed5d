"""dfa jobs choose their features by attribution to the metric (default on labelled prompts).

The DFA runner (a plain class, no Ray) on the tiny Llama and its z SAE: on
prompts with answer/wrong labels it decomposes each prompt's features of
largest |activation × ∂metric/∂activation| at the destination, the ranking a
cache of the same prompt (one at a time) gives; without labels, or when asked,
the most active ones; ``by_attribution`` on unlabelled prompts is refused.
"""

from __future__ import annotations

import pytest
import torch

from circuitscan.schemas.jobs import DFAParams, ExecutionSpec, IOISource, JobSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.services.jobs.planning import ShardPlan


@pytest.fixture(scope="module")
def tiny(tiny_hf_model_dir, tiny_hf_sae_dirs):
    from circuitscan.services.jobs.prompt_sources import load_prompts
    from circuitscan.services.model_loading import load_model, load_tokenizer
    from circuitscan.services.sae_loading import load_sae

    model_spec = ModelSpec(source=str(tiny_hf_model_dir))
    model = load_model(model_spec).model
    sae_specs = [SAESpec(source=str(path)) for path in tiny_hf_sae_dirs]
    saes = [load_sae(spec, model) for spec in sae_specs]
    source = IOISource(kind="ioi", n=3, seed=2)
    records = load_prompts(source, lambda: load_tokenizer(model_spec))
    return model, saes, model_spec, sae_specs, source, records


def _rows(tiny, features, records=None):
    from circuitscan.services.jobs.kinds.dfa import DFARunner

    model, saes, model_spec, sae_specs, source, all_records = tiny
    records = records or all_records
    spec = JobSpec(
        name="dfa", model=model_spec, saes=sae_specs, prompts=source,
        job=DFAParams(kind="dfa", position="END", features=features, top_features=2),
        store="memory://unused", execution=ExecutionSpec(num_actors=1, batch_size=4),
    )  # fmt: skip
    plan = ShardPlan(shard_id=0, start=0, stop=len(records))
    return DFARunner(spec, model, saes).compute(plan, records, None).partial.rows


def _top_by_attribution(tiny, record, top=2):
    from circuitscan.pipelines.batching import tokenize_prompts
    from circuitscan.pipelines.caching import cache_batch
    from circuitscan.schemas.metrics import MetricSpec

    model, saes, *_ = tiny
    batch = tokenize_prompts(model, [record])
    site = cache_batch(
        model, [s.sae for s in saes], batch.tokens, batch.lengths, MetricSpec(),
        answer=batch.answer, wrong=batch.wrong,
    )["L1.z"]  # fmt: skip
    at = site.token_index == record.positions["END"]
    scores = (site.activations[at] * site.gradients[at]).abs()
    order = torch.argsort(scores, descending=True)[:top]
    return [int(site.feature_ids[at][j]) for j in order.tolist() if scores[j] > 0]


def test_labelled_prompts_get_their_features_by_attribution(tiny):
    records = tiny[-1]
    rows = _rows(tiny, None)
    assert {row.chosen_by for row in rows} == {"by_attribution"}
    for prompt, record in enumerate(records):
        chosen = [row.feature for row in rows if row.prompt == prompt]
        assert chosen == _top_by_attribution(tiny, record)
    assert [(r.prompt, r.feature) for r in _rows(tiny, "by_attribution")] == [
        (r.prompt, r.feature) for r in rows
    ]


def test_by_activation_and_unlabelled_prompts_take_the_most_active(tiny):
    from circuitscan.pipelines.analyses.dfa import dfa_features
    from circuitscan.pipelines.batching import tokenize_prompts
    from circuitscan.services.jobs.kinds.dfa import DFAJobError

    model, saes, *_, records = tiny
    by_activation = _rows(tiny, "by_activation")
    assert {row.chosen_by for row in by_activation} == {"by_activation"}
    for prompt, record in enumerate(records):
        tokens = tokenize_prompts(model, [record]).tokens[0]
        expected = dfa_features(
            model, [s.sae for s in saes], tokens, 1, record.positions["END"], top=2
        )
        assert [r.feature for r in by_activation if r.prompt == prompt] == [
            e.feature for e in expected
        ]
    unlabelled = [r.model_copy(update={"answer": None, "wrong": None}) for r in records]
    default = _rows(tiny, None, unlabelled)
    assert {row.chosen_by for row in default} == {"by_activation"}
    assert [r.feature for r in default] == [r.feature for r in by_activation]
    with pytest.raises(DFAJobError, match="by_attribution needs the metric's labels"):
        _rows(tiny, "by_attribution", unlabelled)


def test_features_accepts_ids_or_a_rule():
    from pydantic import ValidationError

    assert DFAParams(kind="dfa", features="by_attribution").features == "by_attribution"
    assert DFAParams(kind="dfa", features=[3, 1]).features == [3, 1]
    with pytest.raises(ValidationError):
        DFAParams(kind="dfa", features="by_magic")
