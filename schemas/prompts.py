"""One prompt of a prompt set, with its labels and its corrupted counterpart."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PromptRecord(BaseModel):
    """A prompt as every job sees it: text plus the labels metrics need.

    Answers are strings that must tokenize to exactly one token for the model
    (checked where the tokenizer is known, not here: validators do no I/O).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(description="The clean prompt text (without BOS).")
    answer: str | None = Field(default=None, description="Correct next token, e.g. ' Mary'.")
    wrong: str | None = Field(default=None, description="Competing token, e.g. ' John'.")
    corrupted: str | None = Field(
        default=None,
        description="Corrupted counterpart (e.g. ABC-style IOI) with the same token length.",
    )
    template: str | None = Field(default=None, description="Template id the prompt came from.")
    positions: dict[str, int] = Field(
        default_factory=dict,
        description="Named token positions (with BOS counted), e.g. {'IO': 4, 'S1': 2, 'S2': 10}.",
    )
    meta: dict[str, str] = Field(default_factory=dict, description="Free-form string labels.")
