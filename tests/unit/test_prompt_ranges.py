"""Lazy prompt sets: the records of any range equal the eager list's, for every source kind.

The pinned digests are those of the eager loaders as they were before prompt
sets read by range (the same files, seeds and tokenizer), so a store written
before keeps its prompts, and its recorded digest, when it is resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from circuitscan.schemas.jobs import (
    DatasetSource,
    IOISource,
    JobSpec,
    JsonlSource,
    TemplateSource,
    TextFileSource,
)
from circuitscan.services.jobs.input_digest import prompts_digest
from circuitscan.services.jobs.prompt_plan import KeptPrompts, select
from circuitscan.services.jobs.prompt_sources import load_prompts, open_prompts
from circuitscan.testing.tiny_language import tiny_tokenizer

# (prompts, sha256 of the records) of the eager loaders before prompt sets.
PINNED = {
    "ioi_mixed": (70, "5119cb53b2b3692d5310a1ca2b1102d984ef14f4ad1d6f3417363c29db2472c8"),
    "ioi_baba": (9, "5c3018d86e8132c85d248bb7663cc8334e68c32e211d521d495a80cb28f80c7e"),
    "template": (300, "62660538f1a6e461f6073d41979d577cb0b7791a4d800bef8dd653209a67c93e"),
    "text": (7, "2b176d488b40d7b28bd35eee4737e53c98d06791442b8673cb6d9e47b29ad6db"),
    "jsonl": (6, "73b3aadd35bb734758672ae031e4f73026852e2d649e48dff1235437bd447e8d"),
    "dataset": (25, "2900d40d6389f3d3958d0eef998e0f58fa00e81ff0d67edc971aa8b446b08e44"),
}
TEMPLATE = TemplateSource(
    kind="template",
    templates=["When {A} and {B} met, {B} thanked", "{A} saw {B} near the {C}"],
    fillers={"A": [" Mary", " John", " Anna"], "B": [" Tom", " Paul"], "C": [" park", " shop"]},
    answer="{A}",
    wrong="{B}",
    corrupted="{C} and {B}",
    distinct=[["A", "B"]],
    n=300,
    seed=3,
)


def sources(folder: Path) -> dict[str, object]:
    """One source of each kind, with the awkward cases of each (blank lines, CRLF, limits)."""
    import datasets

    text = folder / "p.txt"
    text.write_bytes(
        "first prompt\n\n  \r\nsecond\r\nthird\u2028fourth\n\ufefffifth\rsixth\nlast, no newline".encode()
    )
    jsonl = folder / "p.jsonl"
    rows = [{"text": f"prompt {i}", "answer": " x", "meta": {"i": str(i)}} for i in range(6)]
    lines = [json.dumps(row) for row in rows]
    jsonl.write_text("\n".join(lines[:3]) + "\n\n   \n" + "\r\n".join(lines[3:]) + "\n", "utf-8")
    saved = folder / "ds"
    if not saved.exists():
        datasets.Dataset.from_dict(
            {"sentence": [f"s {i}" for i in range(40)], "label": [i for i in range(40)]}
        ).save_to_disk(saved)
    return {
        "ioi_mixed": IOISource(kind="ioi", n=70, seed=3),
        "ioi_baba": IOISource(kind="ioi", n=9, seed=1, templates="BABA"),
        "template": TEMPLATE,
        "text": TextFileSource(kind="text", path=str(text)),
        "jsonl": JsonlSource(kind="jsonl", path=str(jsonl)),
        "dataset": DatasetSource(
            kind="dataset", path=str(saved), text_column="sentence", answer_column="label", limit=25
        ),
    }


@pytest.fixture(scope="module")
def prompt_sources(tmp_path_factory):
    return sources(tmp_path_factory.mktemp("prompt-sources"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_range_equals_the_eager_list(name, prompt_sources, tokenizer):
    source = prompt_sources[name]
    eager = load_prompts(source, lambda: tokenizer)
    assert (len(eager), prompts_digest(eager)) == PINNED[name]
    n = len(eager)
    reused = open_prompts(source, lambda: tokenizer)  # a worker's set, kept between shards
    assert len(reused) == n
    ranges = [(0, n), (n // 3, n // 2), (0, 1), (n - 1, n), (n // 2, n), (2, 2), (n - 2, n + 5)]
    for start, stop in ranges:
        fresh = open_prompts(source, lambda: tokenizer)  # a worker's first shard
        assert fresh.records(start, stop) == eager[start:stop], (start, stop)
        assert reused.records(start, stop) == eager[start:stop], (start, stop)
        assert reused.texts(start, stop) == [r.text for r in eager[start:stop]]


def test_kept_prompts_skip_the_rejected_ones_by_range(prompt_sources, tokenizer):
    source = prompt_sources["ioi_mixed"]
    eager = load_prompts(source, lambda: tokenizer)
    rejected = [0, 5, 6, 7, 30, 69]
    kept = KeptPrompts(open_prompts(source, lambda: tokenizer), np.array(rejected))
    expected = [r for i, r in enumerate(eager) if i not in rejected]
    assert len(kept) == len(expected) == 64
    for start, stop in [(0, 64), (0, 1), (3, 40), (25, 26), (60, 64), (10, 10)]:
        assert kept[start:stop] == expected[start:stop]
        part = kept.ranges(start, stop)
        assert part.size == stop - start
        assert all(a < b for a, b in part.ranges)
    assert kept.ranges(0, 10).ranges == [(1, 5), (8, 14)]
    assert kept[-1] == expected[-1] and list(kept) == expected


def test_the_token_cap_rejects_what_the_eager_count_rejected(tmp_path, tokenizer):
    """``overlong: reject`` drops the prompts whose tokens exceed the cap, counted as before
    (tokenizer + BOS), whether a prompt is short enough to be passed unseen or not."""
    texts = ["short one", "Mary went to the store " * 3, "é" * 30, "a b c d e f g h", "x " * 40]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(texts), encoding="utf-8")
    spec = JobSpec(
        prompts=TextFileSource(kind="text", path=str(path)),
        saes=[{"source": "default/L15.z"}],
        job={"kind": "cache"},
        store=str(tmp_path / "s"),
        max_prompt_tokens=9,
    )
    lengths = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert all(n <= len(t) + 2 for n, t in zip(lengths, texts, strict=True) if t.isascii())
    prompts = open_prompts(spec.prompts, lambda: tokenizer)
    kept, rejected = select(spec, prompts, 64, lambda: tokenizer)
    assert [r.text for r in kept] == [t for t, n in zip(texts, lengths, strict=True) if n <= 9]
    assert rejected == sum(n > 9 for n in lengths) >= 2
    truncate = spec.model_copy(update={"overlong": "truncate"})
    assert select(truncate, prompts, 64, lambda: tokenizer)[1] == 0  # the workers count cuts


def test_a_generated_million_is_planned_without_building_it(tokenizer):
    """A generated source's cap check is bounded from its words (all ASCII), not counted."""
    spec = JobSpec(
        prompts=TEMPLATE.model_copy(update={"n": 1_000_000}),
        saes=[{"source": "default/L15.z"}],
        job={"kind": "cache"},
        store="memory://million",
    )
    prompts = open_prompts(spec.prompts, lambda: tokenizer)

    def no_tokenizer() -> None:
        raise AssertionError("the driver tokenized a generated source")

    kept, rejected = select(spec, prompts, 64, no_tokenizer)
    assert (len(kept), rejected) == (1_000_000, 0)
    assert kept.ranges(999_936, 1_000_000).ranges == [(999_936, 1_000_000)]
