"""IOI generator: determinism, alignment, positions, errors; the real tokenizer in slow."""

from __future__ import annotations

import re

import pytest

from circuitscan.pipelines.tasks.ioi import IOIGenerationError, generate_ioi, template_ids
from circuitscan.pipelines.tokens import NotSingleTokenError, single_token_id


class WordTokenizer:
    """A real (if simple) word-level tokenizer: one token per word, leading space included.

    Words outside its vocabulary split into characters, so multi-token words
    exist and the single-token filter is exercised.
    """

    _pattern = re.compile(r" ?[A-Za-z]+|[^A-Za-z ]| ")

    def __init__(self, vocabulary: set[str]) -> None:
        self.vocab: dict[str, int] = {}
        self.known = vocabulary

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [0] if add_special_tokens else []
        for piece in self._pattern.findall(text):
            if piece.strip().isalpha() and piece.strip() not in self.known:
                ids.extend(self._id(char) for char in piece)
            else:
                ids.append(self._id(piece))
        return ids


def _tokenizer(excluded: tuple[str, ...] = ()) -> WordTokenizer:
    from circuitscan.pipelines.tasks import ioi

    words = set(ioi.NAMES + ioi.PLACES + ioi.OBJECTS) - set(excluded)
    template_words = re.findall(r"[A-Za-z]+", " ".join(ioi._TEMPLATES.values()))
    return WordTokenizer(words | set(template_words))


def _check_records(tokenizer, records) -> None:
    for record in records:
        clean = tokenizer.encode(record.text, add_special_tokens=False)
        corrupt = tokenizer.encode(record.corrupted, add_special_tokens=False)
        assert len(clean) == len(corrupt)
        answer = single_token_id(tokenizer, record.answer)
        wrong = single_token_id(tokenizer, record.wrong)
        assert answer != wrong
        pos = record.positions
        # positions count BOS, so index the text tokens at position - 1
        assert clean[pos["IO"] - 1] == answer
        assert clean[pos["S1"] - 1] == wrong
        assert clean[pos["S2"] - 1] == wrong
        assert pos["END"] == len(clean)
        order = record.template.split("/")[0]
        assert (pos["IO"] < pos["S1"]) == (order == "ABBA")
        assert pos["S2"] > max(pos["IO"], pos["S1"])
        # ABC: neither clean name survives in the corrupted prompt
        assert answer not in corrupt and wrong not in corrupt


def test_deterministic_for_a_seed() -> None:
    tokenizer = _tokenizer()
    first = generate_ioi(tokenizer, 20, seed=3)
    again = generate_ioi(_tokenizer(), 20, seed=3)
    other = generate_ioi(tokenizer, 20, seed=4)
    assert first == again
    assert first != other
    _check_records(tokenizer, first)


def test_families_and_balance() -> None:
    tokenizer = _tokenizer()
    mixed = generate_ioi(tokenizer, 40)
    orders = [record.template.split("/")[0] for record in mixed]
    assert orders.count("ABBA") == orders.count("BABA") == 20
    for family in ("ABBA", "BABA"):
        records = generate_ioi(tokenizer, 10, templates=family)
        assert {r.template.split("/")[0] for r in records} == {family}
        assert {r.template for r in records} <= set(template_ids(family))
    assert len({r.template for r in mixed}) > 4


def test_multi_token_words_are_filtered_out() -> None:
    excluded = ("Mary", "John", "store", "ring")
    tokenizer = _tokenizer(excluded)
    records = generate_ioi(tokenizer, 60)
    text = " ".join(r.text + " " + r.corrupted for r in records)
    assert not any(re.search(rf"\b{word}\b", text) for word in excluded)
    _check_records(tokenizer, records)


def test_too_few_single_token_names() -> None:
    from circuitscan.pipelines.tasks import ioi

    tokenizer = _tokenizer(ioi.NAMES[:-4])
    with pytest.raises(IOIGenerationError, match="at least 5"):
        generate_ioi(tokenizer, 3)


def test_single_token_id_errors() -> None:
    tokenizer = _tokenizer(("Mary",))
    assert single_token_id(tokenizer, " John") == tokenizer.encode(" John", False)[0]
    with pytest.raises(NotSingleTokenError, match="' Mary' is 5 tokens"):
        single_token_id(tokenizer, " Mary")
    with pytest.raises(ValueError, match="leading space"):
        single_token_id(tokenizer, "John and")


@pytest.mark.slow
def test_real_tokenizer_alignment() -> None:
    from circuitscan.services.model_loading import load_tokenizer

    tokenizer = load_tokenizer()
    records = generate_ioi(tokenizer, 100, seed=1)
    _check_records(tokenizer, records)
    # TransformerLens prepends BOS, which the positions count
    ids = [tokenizer.bos_token_id, *tokenizer.encode(records[0].text, add_special_tokens=False)]
    assert ids[records[0].positions["IO"]] == single_token_id(tokenizer, records[0].answer)
