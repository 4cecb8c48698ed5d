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
    filler = TemplateFiller(
        templates, fillers, seed=seed, answer=answer, wrong=wrong, corrupted=corrupted,
        distinct=distinct,
    )  # fmt: skip
    return filler.records(0, n)


class TemplateFiller:
    """Prompts ``[start, stop)`` of a seed's sequence, without building the ones before them.

    ``fill_templates(n=N)[a:b] == records(a, b)`` for any ``N >= b``: reaching
    ``start`` replays only the random draws of the earlier prompts, and the
    filler keeps its place, so consecutive ranges cost nothing extra.
    """

    def __init__(
        self,
        templates: list[str],
        fillers: dict[str, list[str]],
        *,
        seed: int = 0,
        answer: str | None = None,
        wrong: str | None = None,
        corrupted: str | None = None,
        distinct: list[list[str]] | None = None,
    ) -> None:
        self.templates = templates
        self.fillers = fillers
        self.seed = seed
        self.answer, self.wrong, self.corrupted = answer, wrong, corrupted
        self.groups = [list(group) for group in (distinct or [])]
        self._rng = random.Random(seed)
        self._next = 0
        self._plans: dict[str, tuple[list[list[str]], list[str], str | None]] = {}

    def _plan(self, template: str) -> tuple[list[list[str]], list[str], str | None]:
        """What drawing ``template``'s values takes: each distinct group's slots in use, the
        other slots in order, and the error the group sizes raise (when drawn)."""
        if template not in self._plans:
            needed = {
                *_slots(template), *_slots(self.answer), *_slots(self.wrong), *_slots(self.corrupted)
            }  # fmt: skip
            members_of = [[slot for slot in group if slot in needed] for group in self.groups]
            error = None
            for members in members_of:
                pool = set().union(*(self.fillers[slot] for slot in members)) if members else set()
                if len(pool) < len(members):
                    error = f"not enough distinct words for slots {members}"
                    break
            grouped = {slot for members in members_of for slot in members}
            self._plans[template] = (members_of, sorted(needed - grouped), error)
        return self._plans[template]

    def _draw(self) -> tuple[str, dict[str, str]]:
        rng = self._rng
        templates = self.templates
        template = templates[rng.randrange(len(templates))] if len(templates) > 1 else templates[0]
        members_of, rest, error = self._plan(template)
        if error is not None:  # what the draw would raise at that group (nothing follows it)
            raise UserInputError(error)
        values: dict[str, str] = {}
        for members in members_of:
            chosen: list[str] = []
            for slot in members:
                options = [word for word in self.fillers[slot] if word not in chosen]
                if not options:
                    raise UserInputError(f"not enough distinct words for slots {members}")
                word = options[rng.randrange(len(options))]
                chosen.append(word)
                values[slot] = word
        for slot in rest:
            words = self.fillers[slot]
            values[slot] = words[rng.randrange(len(words))]
        return template, values

    def longest_ascii(self) -> int | None:
        """An upper bound on a prompt's characters, when every prompt is ASCII (else None)."""
        words = [word for options in self.fillers.values() for word in options]
        if not all(text.isascii() for text in [*words, *self.templates]):
            return None
        longest = {
            slot: max((len(w) for w in options), default=0)
            for slot, options in self.fillers.items()
        }
        bound = 0
        for template in self.templates:
            parts = string.Formatter().parse(template)
            size = sum(
                len(lit) + (longest.get(field, 0) if field else 0) for lit, field, _, _ in parts
            )
            bound = max(bound, size)
        return bound

    def records(self, start: int, stop: int) -> list[PromptRecord]:
        """Prompts ``start`` to ``stop - 1`` (0-based) of the sequence."""
        if start < self._next:  # behind the filler: start the sequence again
            self._rng = random.Random(self.seed)
            self._next = 0
        while self._next < start:
            self._draw()
            self._next += 1
        records = []
        for index in range(start, max(start, stop)):
            template, values = self._draw()
            self._next = index + 1
            records.append(
                PromptRecord(
                    text=template.format(**values),
                    answer=self.answer.format(**values) if self.answer else None,
                    wrong=self.wrong.format(**values) if self.wrong else None,
                    corrupted=self.corrupted.format(**values) if self.corrupted else None,
                    template=f"t{self.templates.index(template)}",
                    meta=values,
                )
            )
        return records
