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
    pool = single_token_words(tokenizer, names)
    place_pool = single_token_words(tokenizer, places)
    object_pool = single_token_words(tokenizer, objects)
    if len(pool) < 5:
        raise IOIGenerationError(
            f"only {len(pool)} of the candidate names are single tokens; IOI needs at least 5"
        )
    if not place_pool or not object_pool:
        raise IOIGenerationError("no single-token places or objects for this tokenizer")
    rng = random.Random(seed)
    keys = sorted(_TEMPLATES)
    records: list[PromptRecord] = []
    for index in range(n):
        order = templates if templates != "mixed" else ("ABBA", "BABA")[index % 2]
        key = keys[rng.randrange(len(keys))]
        io, s, c_io, c_s1, c_s2 = rng.sample(pool, 5)
        place = place_pool[rng.randrange(len(place_pool))]
        obj = object_pool[rng.randrange(len(object_pool))]
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
        records.append(
            PromptRecord(
                text=text,
                answer=" " + io,
                wrong=" " + s,
                corrupted=corrupted,
                template=f"{order}/{key}",
                positions=positions,
                meta={"task": "ioi", "order": order, "io": io, "s": s, "place": place,
                      "object": obj, "seed": str(seed), "index": str(index)},
            )
        )  # fmt: skip
    return records
