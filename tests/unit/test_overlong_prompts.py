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


def test_batches_under_a_token_budget_stay_within_it_in_order() -> None:
    from circuitscan.services.jobs.shard_runner import budget_batches

    lengths = [5, 30, 4, 4, 4, 4, 4, 4, 64, 3, 3]
    batches = budget_batches(lengths, batch_size=4, batch_tokens=32)
    assert [i for part in batches for i in part] == list(range(len(lengths)))  # every prompt once
    for part in batches:
        widest = max(lengths[i] for i in part)
        assert len(part) <= 4
        assert len(part) * widest <= 32 or len(part) == 1, (part, widest)
    # Short prompts fill a batch to the count; the 64-token one (over the budget) runs alone.
    assert [list(p) for p in batches] == [[0], [1], [2, 3, 4, 5], [6, 7], [8], [9, 10]]
    assert budget_batches(lengths, 4, None) == [range(0, 4), range(4, 8), range(8, 11)]
    assert budget_batches([], 4, 32) == []


def test_a_token_budget_changes_the_batches_not_the_values(tiny) -> None:
    """The same shard batched by count and under a token budget stores the same values,
    and no batch of the budgeted run is wider than the budget."""
    import torch

    from circuitscan.services.jobs.shard_runner import record_batches

    model, saes = tiny
    records = [LONG] + [PromptRecord(text=f"Prompt {i} is short.") for i in range(5)]

    def spec(**execution: object) -> JobSpec:
        return JobSpec(
            model=ModelSpec(source="unused"),
            saes=[SAESpec(source="unused")],
            prompts=IOISource(kind="ioi", n=2),
            job=CacheParams(kind="cache"),
            metric={"kind": "next_token_loss"},
            store="memory://budget",
            max_prompt_tokens=32,
            overlong="truncate",
            execution={"batch_size": 4, **execution},
        )

    budgeted = spec(batch_tokens=40)
    parts = record_batches(model, records, 32, budgeted)
    assert [len(p) for p in parts] == [1, 4, 1]  # the cut 12,000-word prompt runs alone
    plan = ShardPlan(shard_id=0, start=0, stop=len(records))
    by_count = job_kind("cache").runner(spec(), model, saes).compute(plan, records, None)
    by_tokens = job_kind("cache").runner(budgeted, model, saes).compute(plan, records, None)
    assert by_tokens.token_lists == by_count.token_lists
    assert by_count.site_caches.keys() == by_tokens.site_caches.keys()
    for label, cache in by_count.site_caches.items():
        other = by_tokens.site_caches[label]
        assert other.n_tokens == cache.n_tokens
        assert torch.allclose(other.dense().double(), cache.dense().double(), atol=1e-5), label
        assert torch.allclose(other.error_norm.double(), cache.error_norm.double(), atol=1e-5)


def test_the_memory_check_sizes_the_widest_batch_by_the_token_budget(
    tiny_hf_model_dir, monkeypatch
) -> None:
    """A batch of 8 prompts padded to the cap is refused on a (pretended) small machine;
    under a token budget of one cap-wide prompt the widest batch holds one, and fits."""
    import psutil

    from circuitscan.services.jobs.preflight import check_batch_memory, model_config
    from circuitscan.services.jobs.spec_checks import JobError

    n_ctx = int(model_config(tiny_hf_model_dir).n_ctx)

    def spec(**execution: object) -> JobSpec:
        return JobSpec(
            model=ModelSpec(source=str(tiny_hf_model_dir)),
            saes=[SAESpec(source="unused")],
            prompts=IOISource(kind="ioi", n=8),
            job=CacheParams(kind="cache"),
            store="memory://sized",
            overlong="truncate",
            execution={"batch_size": 8, **execution},
        )

    cfg = model_config(tiny_hf_model_dir)
    one_row = int(cfg.n_heads) * int(cfg.n_layers) * 4 * n_ctx**2  # float32 patterns of one prompt
    memory = psutil.virtual_memory()._replace(total=4 * one_row)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    longest = lambda: [(3, 50 * n_ctx)]  # noqa: E731 - a prompt far over the context
    with pytest.raises(JobError, match=r"prompt 3 runs to \d+ tokens .* a batch of 8 padded"):
        check_batch_memory(spec(), 8, longest)
    check_batch_memory(spec(batch_tokens=n_ctx), 8, longest)  # one prompt a batch: fits
