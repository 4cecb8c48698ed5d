"""A prompt far longer than the cap is cut to it before any tensor is sized by its text.

Under ``overlong: truncate`` a worker keeps BOS and the prompt's last tokens
(the metric reads the last position), so a shard's batch is as wide as the
cap whatever the text's length. A 12,000-word prompt on the tiny local
Llama (context 128), cut to 32 tokens and to the model's own context, runs
through a cache shard's computation (in process, no Ray) with tensors of
the cap's width only.
"""

from __future__ import annotations

import pytest

from circuitscan.schemas.jobs import CacheParams, IOISource, JobSpec
from circuitscan.schemas.models import ModelSpec, SAESpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.kinds import job_kind
from circuitscan.services.jobs.planning import ShardPlan
from circuitscan.services.jobs.shard_runner import tokenize_capped_counting
from circuitscan.services.model_loading import load_model
from circuitscan.services.sae_loading import load_sae

WORDS = 12_000
LONG = PromptRecord(text=" ".join(["the quick brown fox jumps over a lazy dog"] * (WORDS // 9)))


@pytest.fixture(scope="module")
def tiny(tiny_hf_model_dir, tiny_hf_sae_dirs):
    model = load_model(ModelSpec(source=str(tiny_hf_model_dir))).model
    saes = [load_sae(SAESpec(source=str(path)), model) for path in tiny_hf_sae_dirs]
    return model, saes


def test_the_cut_keeps_bos_and_the_prompts_end_whatever_the_cap(tiny) -> None:
    model, _ = tiny
    text_ids = model.tokenizer(LONG.text, add_special_tokens=False)["input_ids"]
    assert len(text_ids) > 50 * model.cfg.n_ctx  # far over any cap
    for cap in (32, int(model.cfg.n_ctx)):
        batch, removed = tokenize_capped_counting(model, [LONG], cap)
        assert tuple(batch.tokens.shape) == (1, cap) and batch.lengths.tolist() == [cap]
        ids = batch.tokens[0].tolist()
        assert ids[0] == model.tokenizer.bos_token_id
        assert ids[1:] == text_ids[-(cap - 1) :], "the cut must keep the end of the prompt"
        assert removed == [len(text_ids) + 1 - cap]


def test_a_cache_shard_of_a_12000_word_prompt_stays_within_the_cap(tiny) -> None:
    model, saes = tiny
    spec = JobSpec(
        model=ModelSpec(source="unused"),
        saes=[SAESpec(source="unused")],
        prompts=IOISource(kind="ioi", n=2),
        job=CacheParams(kind="cache"),
        metric={"kind": "next_token_loss"},
        store="memory://overlong",
        max_prompt_tokens=32,
        overlong="truncate",
    )
    runner = job_kind("cache").runner(spec, model, saes)
    short = PromptRecord(text="A short prompt.")
    computed = runner.compute(ShardPlan(shard_id=0, start=0, stop=2), [LONG, short], None)
    lengths = [len(ids) for ids in computed.token_lists]
    assert lengths[0] == 32 and lengths[1] < 32
    assert computed.site_caches, "the shard cached no site"
    for cache in computed.site_caches.values():
        assert cache.n_tokens == sum(lengths) == cache.error_norm.shape[0]
