"""Per-prompt metrics on a (right-padded) batch of logits."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.metrics import MetricSpec


def read_positions(
    spec: MetricSpec, lengths: Int[torch.Tensor, " batch"]
) -> Int[torch.Tensor, " batch"]:
    """The position each prompt's metric reads (last real token, or a fixed index)."""
    if spec.position == "last":
        return lengths - 1
    position = torch.full_like(lengths, spec.position)
    if bool((position >= lengths).any()):
        bad = int(torch.nonzero(position >= lengths)[0, 0])
        raise UserInputError(
            f"metric position {spec.position} is out of range for prompt {bad} "
            f"of length {int(lengths[bad])}"
        )
    return position


def metric_per_prompt(
    logits: Float[torch.Tensor, "batch seq vocab"],
    spec: MetricSpec,
    *,
    lengths: Int[torch.Tensor, " batch"],
    tokens: Int[torch.Tensor, "batch seq"] | None = None,
    answer: Int[torch.Tensor, " batch"] | None = None,
    wrong: Int[torch.Tensor, " batch"] | None = None,
) -> Float[torch.Tensor, " batch"]:
    """The metric of each prompt, in logit units (logit_diff), nats (loss, logprob).

    ``lengths`` counts each prompt's real tokens; positions at or past it are
    padding and never enter a metric. Summing the result over the batch gives
    a scalar whose gradient is each prompt's own metric gradient, because
    prompts do not interact.
    """
    batch = torch.arange(logits.shape[0], device=logits.device)
    if spec.kind == "next_token_loss":
        if tokens is None:
            raise UserInputError("next_token_loss needs the token ids")
        logprobs = logits[:, :-1].log_softmax(-1)
        targets = tokens[:, 1:]
        token_loss = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        steps = torch.arange(targets.shape[1], device=logits.device)
        real = steps.unsqueeze(0) < (lengths - 1).unsqueeze(1)
        return (token_loss * real).sum(-1) / real.sum(-1).clamp(min=1)
    if answer is None:
        raise UserInputError(f"metric {spec.kind} needs an answer token per prompt")
    positions = read_positions(spec, lengths)
    read = logits[batch, positions]
    if spec.kind == "target_logprob":
        return read.log_softmax(-1)[batch, answer]
    if wrong is None:
        raise UserInputError("logit_diff needs a wrong-answer token per prompt")
    return read[batch, answer] - read[batch, wrong]
