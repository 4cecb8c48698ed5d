"""PromptRecords → right-padded token batches with the answer ids metrics read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from transformer_lens import HookedTransformer

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.prompts import PromptRecord


class TokenizationError(UserInputError):
    """A prompt or answer string that cannot be tokenized as the job needs."""


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids of a batch of prompts (BOS prepended)."""

    tokens: Int[torch.Tensor, "batch seq"]
    lengths: Int[torch.Tensor, " batch"]
    answer: Int[torch.Tensor, " batch"] | None
    wrong: Int[torch.Tensor, " batch"] | None

    def token_lists(self) -> list[list[int]]:
        """Each prompt's real token ids (padding dropped)."""
        return [row[: int(n)].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def single_token(model: HookedTransformer, text: str) -> int:
    """The one token id ``text`` encodes to (no BOS); TokenizationError otherwise."""
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if ids.numel() != 1:
        pieces = [model.to_string([int(i)]) for i in ids]
        raise TokenizationError(
            f"answer {text!r} must be a single token but encodes to {ids.numel()}: {pieces}"
        )
    return int(ids[0])


def pad_right(
    sequences: Sequence[Sequence[int]], *, pad_id: int = 0, device: torch.device | str = "cpu"
) -> tuple[Int[torch.Tensor, "batch seq"], Int[torch.Tensor, " batch"]]:
    """Stack ragged token lists into a right-padded batch and their lengths.

    Right padding is safe under causal attention: a real position never
    attends to a later (padding) one, so no attention mask is needed.
    """
    if not sequences or any(len(seq) == 0 for seq in sequences):
        raise TokenizationError("every prompt needs at least one token")
    width = max(len(seq) for seq in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    return tokens.to(device), lengths.to(device)


def tokenize_prompts(
    model: HookedTransformer,
    prompts: Sequence[PromptRecord],
    *,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> TokenBatch:
    """Tokenize each prompt with BOS prepended (``model.to_tokens``) and right-pad.

    Answers/wrong answers must be single tokens; a prompt longer than
    ``max_tokens`` (BOS counted) is a TokenizationError naming it.
    """
    if model.tokenizer is None:
        raise TokenizationError("the model has no tokenizer; pass token ids instead")
    device = device if device is not None else model.cfg.device or "cpu"
    sequences: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        ids = model.to_tokens(prompt.text, prepend_bos=True)[0].tolist()
        if max_tokens is not None and len(ids) > max_tokens:
            raise TokenizationError(
                f"prompt {index} has {len(ids)} tokens, over the cap of {max_tokens}"
            )
        sequences.append(ids)
    pad_id = model.tokenizer.pad_token_id or 0
    tokens, lengths = pad_right(sequences, pad_id=pad_id, device=device)
    answer = wrong = None
    if all(p.answer is not None for p in prompts):
        answer = torch.tensor([single_token(model, p.answer) for p in prompts], device=device)  # type: ignore[arg-type]
    if all(p.wrong is not None for p in prompts):
        wrong = torch.tensor([single_token(model, p.wrong) for p in prompts], device=device)  # type: ignore[arg-type]
    return TokenBatch(tokens=tokens, lengths=lengths, answer=answer, wrong=wrong)
