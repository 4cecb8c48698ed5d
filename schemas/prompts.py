"""One prompt of a prompt set, with its labels and its corrupted counterpart."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PromptRecord(BaseModel):
    """A prompt as every job sees it: text plus the labels metrics need.

    Answers are strings that must tokenize to exactly one token for the model
    (checked on the driver before a job starts, not here: validators do no
    I/O). Token positions count the model's BOS token as position 0. A
    corrupted prompt is scored with its clean prompt's ``answer`` and
    ``wrong``: the metric asks how far the corruption moves the clean task.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(
        description="The clean prompt text, without BOS (the model's BOS is prepended to it)."
    )
    answer: str | None = Field(
        default=None,
        description="The correct next token after the text, e.g. ' Mary': exactly one token, "
        "leading space included. logit_diff and target_logprob read it, for the clean and the "
        "corrupted run alike.",
    )
    wrong: str | None = Field(
        default=None,
        description="The competing token logit_diff subtracts, e.g. ' John' (one token); the "
        "corrupted run is scored with it too.",
    )
    corrupted: str | None = Field(
        default=None,
        description="Corrupted counterpart (e.g. ABC-style IOI), scored with this record's "
        "answer and wrong tokens. Patched position by position, so of the same token length "
        "as the text unless the job sets align: end.",
    )
    template: str | None = Field(
        default=None,
        description="Template id the prompt came from (a field to break results down by).",
    )
    positions: dict[str, int] = Field(
        default_factory=dict,
        description="Named token positions, counted with BOS at 0 (the text's first token is 1), "
        "e.g. {'IO': 4, 'S1': 2, 'S2': 10}; jobs name them in positions: [...].",
    )
    meta: dict[str, str] = Field(
        default_factory=dict,
        description="Free-form string labels, e.g. {'group': 'sports'} (keys to break results down by).",
    )
