"""The scalar of the model's output that caching and attribution differentiate."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MetricKind = Literal["logit_diff", "next_token_loss", "target_logprob"]


class MetricSpec(BaseModel):
    """Which metric m(x) a job computes per prompt.

    - ``logit_diff``: logit[answer] − logit[wrong] at ``position``;
    - ``target_logprob``: log p(answer) at ``position``;
    - ``next_token_loss``: mean next-token cross-entropy over the prompt's real tokens.

    Answer and wrong tokens come with each prompt (its labels).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: MetricKind = Field(default="logit_diff", description="Metric to compute.")
    position: Literal["last"] | int = Field(
        default="last",
        description="Token position read by logit_diff/target_logprob: 'last' real token "
        "of each prompt, or a fixed 0-based index.",
    )
