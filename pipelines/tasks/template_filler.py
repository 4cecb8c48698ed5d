"""Fill prompt templates from word lists: a generic task generator.

Deterministic for a seed. Pure Python: it knows nothing about tokenizers, so
single-token checks of answers happen where the tokenizer is (the job runner).
"""

from __future__ import annotations

import random
import string

from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.prompts import PromptRecord


def _slots(text: str | None) -> list[str]:
    if not text:
        return []
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def fill_templates(
    templates: list[str],
    fillers: dict[str, list[str]],
    *,
    n: int,
    seed: int = 0,
    answer: str | None = None,
    wrong: str | None = None,
    corrupted: str | None = None,
    distinct: list[list[str]] | None = None,
) -> list[PromptRecord]:
    """``n`` prompts, each a template with every ``{slot}`` replaced by a word.

    Slots in one ``distinct`` group get pairwise different words. ``answer``,
    ``wrong`` and ``corrupted`` are templates over the same slot values.
    """
    rng = random.Random(seed)
    groups = [list(group) for group in (distinct or [])]
    records: list[PromptRecord] = []
    for _ in range(n):
        template = templates[rng.randrange(len(templates))] if len(templates) > 1 else templates[0]
        needed = {*_slots(template), *_slots(answer), *_slots(wrong), *_slots(corrupted)}
        values: dict[str, str] = {}
        for group in groups:
            members = [slot for slot in group if slot in needed]
            pool = sorted(set().union(*(fillers[slot] for slot in members))) if members else []
            if len(pool) < len(members):
                raise UserInputError(f"not enough distinct words for slots {members}")
            chosen: list[str] = []
            for slot in members:
                options = [word for word in fillers[slot] if word not in chosen]
                if not options:
                    raise UserInputError(f"not enough distinct words for slots {members}")
                word = options[rng.randrange(len(options))]
                chosen.append(word)
                values[slot] = word
        for slot in sorted(needed - values.keys()):
            words = fillers[slot]
            values[slot] = words[rng.randrange(len(words))]
        records.append(
            PromptRecord(
                text=template.format(**values),
                answer=answer.format(**values) if answer else None,
                wrong=wrong.format(**values) if wrong else None,
                corrupted=corrupted.format(**values) if corrupted else None,
                template=f"t{templates.index(template)}",
                meta=values,
            )
        )
    return records
