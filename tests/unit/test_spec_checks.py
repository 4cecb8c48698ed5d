"""Driver-side checks of a job against its prompts, made before any store exists."""

from __future__ import annotations

import pytest

from circuitscan.schemas.jobs import (
    AblationScanParams,
    AttributeParams,
    CacheParams,
    DFAParams,
    IOISource,
    JobSpec,
)
from circuitscan.schemas.metrics import MetricSpec
from circuitscan.schemas.prompts import PromptRecord
from circuitscan.services.jobs.spec_checks import (
    JobError,
    check_named_positions,
    check_prompts,
    position_notes,
)


def _spec(job) -> JobSpec:
    return JobSpec(
        saes=[{"source": "default/L15.resid_post"}],
        prompts=IOISource(kind="ioi", n=2),
        job=job,
        store="memory://checks",
    )


def _record(text: str, **positions: int) -> PromptRecord:
    return PromptRecord(text=text, corrupted=text, positions=positions)


SAME_TEMPLATE = [_record("a b c", IO=2, S1=3, END=5), _record("d e f", IO=2, S1=3, END=5)]
MIXED_TEMPLATES = [_record("a b c", IO=2, S1=3, END=5), _record("g h", IO=4, S1=2, END=9)]


@pytest.mark.parametrize(
    "job",
    [
        AttributeParams(kind="attribute", positions=["IO", "S2"]),
        AblationScanParams(kind="ablation_scan", positions=["last", "S2"]),
        DFAParams(kind="dfa", position="S2", top_features=2),
    ],
    ids=["attribute", "ablation_scan", "dfa"],
)
def test_a_position_name_the_prompts_lack_is_refused(job) -> None:
    with pytest.raises(JobError, match=r"position 'S2' is not a named position of 2 of 2 prompts"):
        check_named_positions(_spec(job), SAME_TEMPLATE)


@pytest.mark.parametrize(
    "job",
    [
        AttributeParams(kind="attribute", positions=["IO", "last", "END"]),
        AttributeParams(kind="attribute", positions="all"),
        AblationScanParams(kind="ablation_scan", positions="last"),
        DFAParams(kind="dfa", position=4, top_features=2),
        CacheParams(kind="cache"),
    ],
)
def test_names_the_prompts_have_and_unnamed_positions_pass(job) -> None:
    check_named_positions(_spec(job), SAME_TEMPLATE)


def test_all_positions_on_mixed_templates_gets_a_note_naming_the_roles() -> None:
    spec = _spec(AttributeParams(kind="attribute", positions="all"))
    (note,) = position_notes(spec, MIXED_TEMPLATES)
    assert "END at 2 indices, IO at 2 indices, S1 at 2 indices" in note
    assert "positions: ['END', 'IO', 'S1']" in note


def test_no_note_where_index_and_role_agree_or_positions_are_named() -> None:
    assert position_notes(_spec(AttributeParams(kind="attribute")), SAME_TEMPLATE) == []
    named = _spec(AttributeParams(kind="attribute", positions=["IO", "END"]))
    assert position_notes(named, MIXED_TEMPLATES) == []
    plain = [PromptRecord(text="x y", corrupted="x z"), PromptRecord(text="u", corrupted="v")]
    assert position_notes(_spec(AttributeParams(kind="attribute")), plain) == []


UNLABELLED = [PromptRecord(text="one two"), PromptRecord(text="three", answer=" four")]


@pytest.mark.parametrize(
    ("metric", "job", "label"),
    [
        ("logit_diff", CacheParams(kind="cache"), "answer"),
        ("target_logprob", AblationScanParams(kind="ablation_scan"), "answer"),
    ],
)
def test_a_metric_that_reads_answers_needs_them_on_every_prompt(metric, job, label) -> None:
    spec = _spec(job).model_copy(update={"metric": MetricSpec(kind=metric)})
    with pytest.raises(JobError, match=rf"metric {metric} needs the '{label}' label .* 1 of 2"):
        check_prompts(spec, UNLABELLED)


def test_labels_are_not_needed_where_the_metric_is_not_read() -> None:
    for job in (CacheParams(kind="cache", gradients=False), DFAParams(kind="dfa", top_features=1)):
        check_prompts(_spec(job), UNLABELLED)
    loss = _spec(CacheParams(kind="cache")).model_copy(
        update={"metric": MetricSpec(kind="next_token_loss")}
    )
    check_prompts(loss, UNLABELLED)
    wrong_missing = [PromptRecord(text="a", answer=" b")]
    logprob = loss.model_copy(update={"metric": MetricSpec(kind="target_logprob")})
    check_prompts(logprob, wrong_missing)
    with pytest.raises(JobError, match="needs the 'wrong' label"):
        check_prompts(_spec(CacheParams(kind="cache")), wrong_missing)
