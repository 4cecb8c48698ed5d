"""Indirect-object identification (IOI) prompts, seeded and tokenizer-checked.

"When Mary and John went to the store, John gave a ring to" → " Mary" (the
indirect object, IO) rather than " John" (the subject, S). ABBA templates name
IO first, BABA templates name S first. Every name, place and object is one
token (with its leading space) for the tokenizer given, so clean and corrupted
prompts have identical token positions.

Corrupted counterparts are ABC-style: IO, S1 and S2 are replaced by three other
names, all distinct, so the corrupted prompt carries no information about which
of the clean answer/wrong tokens is right (its logit difference is near zero).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import Literal

from circuitscan.pipelines.tokens import Tokenizer, encode_plain, is_single_token, single_token_id
from circuitscan.schemas.errors import UserInputError
from circuitscan.schemas.prompts import PromptRecord

TemplateFamily = Literal["ABBA", "BABA", "mixed"]

# Templates are written for the IO-first (ABBA) order; BABA swaps the first
# two names. {A} is the first-named person, {B} the second, {C} the subject
# who acts in the second clause (S2), so ABBA has A=IO, B=C=S.
_TEMPLATES: dict[str, str] = {
    "then_went": "Then, {A} and {B} went to the {PLACE}. {C} gave a {OBJECT} to",
    "when_got": "When {A} and {B} got a {OBJECT} at the {PLACE}, {C} decided to give it to",
    "after_went": "After {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "while_working": "While {A} and {B} were working at the {PLACE}, {C} gave a {OBJECT} to",
    "then_had": "Then, {A} and {B} had a long day at the {PLACE}. {C} handed a {OBJECT} to",
}

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Kate",
    "Anna", "Lisa", "Mark", "Mike", "Sarah", "Jane", "David", "Emma", "Alex", "Ben",
    "Chris", "Sam", "Max", "Jack", "Luke", "Adam", "Ryan", "Eric", "Kevin", "Steve",
    "Laura", "Rose", "Grace", "Lucy", "Alice", "Bob", "Carl", "Joe", "Bill", "Tim",
    "Henry", "Frank", "George", "Michael", "Robert", "William", "Richard", "Thomas",
    "Daniel", "Emily", "Rachel", "Andrew", "Harry", "Oliver", "Peter", "Edward",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "store", "park", "school", "station", "office", "garden", "house", "restaurant",
    "hospital", "beach", "library", "market", "church", "museum", "kitchen", "shop",
    "hotel", "farm", "zoo", "mall", "theater", "airport", "bank", "gym", "lake",
)  # fmt: skip
# Consonant-initial so that the templates' "a" stays grammatical.
OBJECTS: tuple[str, ...] = (
    "ring", "book", "bag", "ball", "cup", "pen", "box", "hat", "key", "card", "gift",
    "cake", "letter", "bottle", "knife", "phone", "coat", "basketball", "computer",
    "drink", "kiss", "bone", "snack", "necklace", "toy", "watch", "flower", "shirt",
)  # fmt: skip


class IOIGenerationError(UserInputError):
    """The IOI generator cannot produce prompts for this tokenizer or these settings."""


def template_ids(family: TemplateFamily = "mixed") -> list[str]:
    """Template ids, e.g. ``ABBA/then_went``, of a family."""
    orders = ("ABBA", "BABA") if family == "mixed" else (family,)
    return [f"{order}/{key}" for order in orders for key in _TEMPLATES]


def single_token_words(tokenizer: Tokenizer, words: Sequence[str]) -> list[str]:
    """The words that are one token when preceded by a space, in input order."""
    return [word for word in words if is_single_token(tokenizer, " " + word)]


def _locate(tokenizer: Tokenizer, text: str, char_start: int, word: str) -> int:
    """Token index (BOS counted) of the one-token word starting at ``char_start``."""
    index = len(encode_plain(tokenizer, text[:char_start]))
    ids = encode_plain(tokenizer, text)
    if index >= len(ids) or ids[index] != single_token_id(tokenizer, " " + word):
        raise IOIGenerationError(
            f"tokenizer merges {word!r} with its neighbours in {text!r}; positions would be wrong"
        )
    return index + 1


def _fill(template: str, names: dict[str, str], place: str, obj: str) -> tuple[str, dict[str, int]]:
    """Template text, and per slot the character offset of the space before its word.

    Offsets are tracked while rendering, so a name that occurs twice (S1, S2)
    is never confused by a string search.
    """
    values = {"PLACE": place, "OBJECT": obj, **names}
    rendered = ""
    starts: dict[str, int] = {}
    for literal, field, _, _ in string.Formatter().parse(template):
        rendered += literal
        if field is not None:
            # the space before the word belongs to the word's token
            starts[field] = len(rendered) - 1
            rendered += values[field]
    return rendered, starts


def generate_ioi(
    tokenizer: Tokenizer,
    n: int,
    *,
    seed: int = 0,
    templates: TemplateFamily = "mixed",
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
) -> list[PromptRecord]:
    """``n`` IOI prompts with answer (IO), wrong (S), ABC corrupted text and positions.

    Deterministic for (tokenizer vocabulary, n, seed, templates). ``mixed``
    alternates ABBA and BABA so a set is balanced. Positions ``IO``, ``S1``,
    ``S2`` and ``END`` (the last token, where the answer is predicted) count
    the BOS token that TransformerLens prepends, and hold for the corrupted
    prompt too.
    """
    if n < 0:
        raise IOIGenerationError(f"n must be non-negative, got {n}")
    generator = IOIGenerator(
        tokenizer, seed=seed, templates=templates, names=names, places=places, objects=objects
    )
    return generator.records(0, n)


class IOIGenerator:
    """Prompts ``[start, stop)`` of the IOI sequence of a seed, without the ones before them.

    Prompt ``i`` is the same whatever ``n`` is (``generate_ioi(n)[a:b] ==
    records(a, b)``). Reaching prompt ``start`` replays only the random draws
    of the prompts before it (microseconds each; the tokenizer checks that
    make a prompt expensive run only for the prompts returned), and the
    generator keeps its place, so consecutive ranges cost nothing extra.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seed: int = 0,
        templates: TemplateFamily = "mixed",
        names: Sequence[str] = NAMES,
        places: Sequence[str] = PLACES,
        objects: Sequence[str] = OBJECTS,
    ) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.templates = templates
        self.pool = single_token_words(tokenizer, names)
        self.place_pool = single_token_words(tokenizer, places)
        self.object_pool = single_token_words(tokenizer, objects)
        if len(self.pool) < 5:
            raise IOIGenerationError(
                f"only {len(self.pool)} of the candidate names are single tokens; IOI needs at least 5"
            )
        if not self.place_pool or not self.object_pool:
            raise IOIGenerationError("no single-token places or objects for this tokenizer")
        self._keys = sorted(_TEMPLATES)
        self._rng = random.Random(seed)
        self._next = 0  # the index whose draws the generator's state is at

    def _draw(self, index: int) -> tuple[str, str, list[str], str, str]:
        rng = self._rng
        order = self.templates if self.templates != "mixed" else ("ABBA", "BABA")[index % 2]
        key = self._keys[rng.randrange(len(self._keys))]
        people = rng.sample(self.pool, 5)
        place = self.place_pool[rng.randrange(len(self.place_pool))]
        obj = self.object_pool[rng.randrange(len(self.object_pool))]
        return order, key, people, place, obj

    def records(self, start: int, stop: int) -> list[PromptRecord]:
        """Prompts ``start`` to ``stop - 1`` (0-based) of the sequence."""
        if start < self._next:  # behind the generator: start the sequence again
            self._rng = random.Random(self.seed)
            self._next = 0
        while self._next < start:
            self._draw(self._next)
            self._next += 1
        records = []
        for index in range(start, max(start, stop)):
            records.append(self._record(index, *self._draw(index)))
            self._next = index + 1
        return records

    def longest_ascii(self) -> int | None:
        """An upper bound on a prompt's characters, when every prompt is ASCII (else None)."""
        words = [*self.pool, *self.place_pool, *self.object_pool]
        if not all(word.isascii() for word in words):
            return None
        name = max(len(w) for w in self.pool)
        longest = {"A": name, "B": name, "C": name, "PLACE": max(map(len, self.place_pool))}
        longest["OBJECT"] = max(len(w) for w in self.object_pool)
        bound = 0
        for template in _TEMPLATES.values():
            parts = list(string.Formatter().parse(template))
            size = sum(len(lit) + (longest[field] if field else 0) for lit, field, _, _ in parts)
            bound = max(bound, size)
        return bound if all(t.isascii() for t in _TEMPLATES.values()) else None

    def texts(self, start: int, stop: int) -> list[str]:
        """The clean texts of prompts ``[start, stop)`` (no tokenizer checks: cheap)."""
        if start < self._next:
            self._rng = random.Random(self.seed)
            self._next = 0
        while self._next < start:
            self._draw(self._next)
            self._next += 1
        texts = []
        for index in range(start, max(start, stop)):
            order, key, people, place, obj = self._draw(index)
            self._next = index + 1
            io, s = people[0], people[1]
            first, second = (io, s) if order == "ABBA" else (s, io)
            texts.append(_fill(_TEMPLATES[key], {"A": first, "B": second, "C": s}, place, obj)[0])
        return texts

    def _record(
        self, index: int, order: str, key: str, people: list[str], place: str, obj: str
    ) -> PromptRecord:
        tokenizer = self.tokenizer
        io, s, c_io, c_s1, c_s2 = people
        template = _TEMPLATES[key]
        first, second = (io, s) if order == "ABBA" else (s, io)
        text, starts = _fill(template, {"A": first, "B": second, "C": s}, place, obj)
        cfirst, csecond = (c_io, c_s1) if order == "ABBA" else (c_s1, c_io)
        corrupted, _ = _fill(template, {"A": cfirst, "B": csecond, "C": c_s2}, place, obj)
        io_slot, s1_slot = ("A", "B") if order == "ABBA" else ("B", "A")
        positions = {
            "IO": _locate(tokenizer, text, starts[io_slot], io),
            "S1": _locate(tokenizer, text, starts[s1_slot], s),
            "S2": _locate(tokenizer, text, starts["C"], s),
            "END": len(encode_plain(tokenizer, text)),
        }
        if len(encode_plain(tokenizer, corrupted)) != len(encode_plain(tokenizer, text)):
            raise IOIGenerationError(
                f"corrupted prompt {corrupted!r} is not token-aligned with {text!r}"
            )
        seed = self.seed
        return PromptRecord(
            text=text,
            answer=" " + io,
            wrong=" " + s,
            corrupted=corrupted,
            template=f"{order}/{key}",
            positions=positions,
            meta={"task": "ioi", "order": order, "io": io, "s": s, "place": place,
                  "object": obj, "seed": str(seed), "index": str(index)},
        )  # fmt: skip
