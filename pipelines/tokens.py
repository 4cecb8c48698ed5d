"""Token-level checks shared by every task and job: is this string one token?"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from circuitscan.schemas.errors import UserInputError


@runtime_checkable  # so that runtime type checks (jaxtyping + beartype in tests) can test it
class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that circuitscan relies on."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> Any: ...


class NotSingleTokenError(UserInputError):
    """A string that must be exactly one token for the model's tokenizer is not."""


def encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added."""
    return [int(token) for token in tokenizer.encode(text, add_special_tokens=False)]


def is_single_token(tokenizer: Tokenizer, text: str) -> bool:
    return len(encode_plain(tokenizer, text)) == 1


def single_token_id(tokenizer: Tokenizer, text: str) -> int:
    """The id of ``text`` if it is exactly one token, else a NotSingleTokenError.

    Answers such as ``' Mary'`` carry their leading space: ``'Mary'`` and
    ``' Mary'`` are different tokens for BPE tokenizers.
    """
    ids = encode_plain(tokenizer, text)
    if len(ids) != 1:
        pieces = _pieces(tokenizer, ids)
        raise NotSingleTokenError(
            f"{text!r} is {len(ids)} tokens for this tokenizer ({pieces}), expected exactly one"
            + ("; did you forget the leading space?" if text and not text[0].isspace() else "")
        )
    return ids[0]


def _pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str] | list[int]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return ids
    return list(convert(ids))
