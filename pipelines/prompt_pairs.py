"""Clean/corrupted prompt pairs as the attribution engine takes them.

The engine works on right-padded token ids with their lengths, answer and
wrong-answer ids, named positions per prompt and, for pairs whose lengths
differ, a clean→corrupted position map. ``PromptPairs`` builds all of them
once, from strings, from prompt records (dicts or ``PromptRecord``) such as
the IOI generator's, or from token ids, so no caller computes lengths by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Int
from transformer_lens import HookedTransformer

from circuitscan.pipelines.attribution.positions import end_aligned_map
from circuitscan.pipelines.batching import TokenizationError, pad_right, tokenize_prompts
from circuitscan.pipelines.tasks.ioi import TemplateFamily, generate_ioi
from circuitscan.schemas.prompts import PromptRecord

Align = Literal["start", "end"]


@dataclass(frozen=True)
class PromptPairs:
    """Right-padded clean prompts, their corrupted counterparts and their labels.

    ``lengths`` counts real tokens (BOS included); ``corrupt`` is None for
    prompts without a counterpart (zero-baseline attribution, caching).
    ``position_map`` (clean position → corrupted position, -1 where there is
    none) is set when the pairs were aligned from the end.
    """

    clean: Int[torch.Tensor, "batch seq"]
    lengths: Int[torch.Tensor, " batch"]
    corrupt: Int[torch.Tensor, "batch seq_corrupt"] | None = None
    corrupt_lengths: Int[torch.Tensor, " batch"] | None = None
    answer: Int[torch.Tensor, " batch"] | None = None
    wrong: Int[torch.Tensor, " batch"] | None = None
    named_positions: list[dict[str, int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    position_map: Int[torch.Tensor, "batch seq"] | None = None

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @classmethod
    def from_records(
        cls,
        model: HookedTransformer,
        records: Sequence[PromptRecord | Mapping[str, Any]],
        *,
        align: Align = "start",
    ) -> PromptPairs:
        """Pairs from prompt records: ``text``, ``corrupted``, ``answer``, ``wrong``, ``positions``.

        Records are ``PromptRecord`` s or dicts of the same fields. Either every
        record has a corrupted text or none has. ``align="end"`` pairs
        positions from the last token (a corruption that changes the length
        early, e.g. a longer preamble); the default pairs them one to one.
        """
        parsed = [r if isinstance(r, PromptRecord) else PromptRecord(**r) for r in records]
        if not parsed:
            raise TokenizationError("no prompts given")
        clean = tokenize_prompts(model, parsed)
        with_corrupt = [r.corrupted is not None for r in parsed]
        corrupt = corrupt_lengths = position_map = None
        if any(with_corrupt):
            if not all(with_corrupt):
                missing = [i for i, has in enumerate(with_corrupt) if not has]
                raise TokenizationError(f"prompts {missing} have no corrupted counterpart")
            batch = tokenize_prompts(
                model,
                [PromptRecord(text=str(r.corrupted)) for r in parsed],
                device=clean.tokens.device,
            )
            corrupt, corrupt_lengths = batch.tokens, batch.lengths
            if align == "end":
                position_map = end_aligned_map(
                    clean.lengths, corrupt_lengths, clean.tokens.shape[1]
                )
        return cls(
            clean=clean.tokens,
            lengths=clean.lengths,
            corrupt=corrupt,
            corrupt_lengths=corrupt_lengths,
            answer=clean.answer,
            wrong=clean.wrong,
            named_positions=[dict(r.positions) for r in parsed],
            texts=[r.text for r in parsed],
            position_map=position_map,
        )

    @classmethod
    def from_strings(
        cls,
        model: HookedTransformer,
        clean: Sequence[str],
        corrupted: Sequence[str] | None = None,
        answers: Sequence[str] | None = None,
        wrong: Sequence[str] | None = None,
        *,
        positions: Sequence[Mapping[str, int]] | None = None,
        align: Align = "start",
    ) -> PromptPairs:
        """Pairs from parallel lists of strings (answers of exactly one token each,
        leading space included, e.g. ``" Mary"``); ``positions``: named token
        positions per prompt, BOS counted."""
        n = len(clean)
        for name, values in (
            ("corrupted", corrupted),
            ("answers", answers),
            ("wrong", wrong),
            ("positions", positions),
        ):
            if values is not None and len(values) != n:
                raise TokenizationError(f"{n} clean prompts but {len(values)} {name}")
        records = [
            PromptRecord(
                text=text,
                corrupted=corrupted[i] if corrupted is not None else None,
                answer=answers[i] if answers is not None else None,
                wrong=wrong[i] if wrong is not None else None,
                positions=dict(positions[i]) if positions is not None else {},
            )
            for i, text in enumerate(clean)
        ]
        return cls.from_records(model, records, align=align)

    @classmethod
    def from_ioi(
        cls,
        model: HookedTransformer,
        n: int,
        *,
        seed: int = 0,
        templates: TemplateFamily = "mixed",
        template: str | None = None,
    ) -> PromptPairs:
        """``n`` IOI prompts and their ABC-corrupted counterparts, with positions IO, S1, S2, END.

        ``template`` (e.g. ``ABBA/then_went``) keeps only prompts of that
        template, so absolute positions mean the same thing in every prompt.
        """
        if model.tokenizer is None:
            raise TokenizationError("IOI prompts need a model with a tokenizer")
        # One template of ten is drawn at random, so twenty times as many draws
        # leave enough of it.
        pool = generate_ioi(
            model.tokenizer, n * (20 if template else 1), seed=seed, templates=templates
        )
        records = [r for r in pool if template is None or r.template == template][:n]
        if len(records) < n:
            raise TokenizationError(f"only {len(records)} IOI prompts of template {template}")
        return cls.from_records(model, records)

    @classmethod
    def from_tokens(
        cls,
        clean: Sequence[Sequence[int]],
        corrupt: Sequence[Sequence[int]] | None = None,
        answer: Sequence[int] | None = None,
        wrong: Sequence[int] | None = None,
        *,
        named_positions: Sequence[Mapping[str, int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> PromptPairs:
        """Pairs from token-id lists (BOS included), for models without a tokenizer."""
        tokens, lengths = pad_right(clean, device=device)
        corrupt_tokens = corrupt_lengths = None
        if corrupt is not None:
            corrupt_tokens, corrupt_lengths = pad_right(corrupt, device=device)

        def ids(values: Sequence[int] | None) -> torch.Tensor | None:
            return None if values is None else torch.tensor(list(values), device=device)

        return cls(
            clean=tokens,
            lengths=lengths,
            corrupt=corrupt_tokens,
            corrupt_lengths=corrupt_lengths,
            answer=ids(answer),
            wrong=ids(wrong),
            named_positions=[dict(p) for p in named_positions or []],
        )
