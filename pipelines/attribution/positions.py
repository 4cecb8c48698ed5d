"""Turning position specs (absolute, 'last', named) into per-prompt token indices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Int

from circuitscan.pipelines.attribution.errors import PositionError
from circuitscan.schemas.attribution import PositionSpec

UNDEFINED = -1


def resolve_positions(
    specs: Sequence[PositionSpec],
    lengths: Int[torch.Tensor, " batch"],
    named: Sequence[Mapping[str, int]] | None = None,
    *,
    strict: bool = True,
) -> Int[torch.Tensor, "batch n_positions"]:
    """Absolute token index of each spec for each prompt.

    ``strict``: an absolute index at or past a prompt's length is an error;
    otherwise it becomes ``UNDEFINED`` (-1) for that prompt, which is how the
    'all positions' selection treats prompts shorter than the longest one.
    """
    batch = lengths.shape[0]
    out = torch.full((batch, len(specs)), UNDEFINED, dtype=torch.long)
    for column, spec in enumerate(specs):
        if spec == "last":
            out[:, column] = lengths.cpu() - 1
        elif isinstance(spec, int):
            if spec < 0:
                raise PositionError(f"position {spec} is negative")
            too_long = lengths.cpu() <= spec
            if strict and bool(too_long.any()):
                bad = int(torch.nonzero(too_long)[0, 0])
                raise PositionError(
                    f"position {spec} is out of range for prompt {bad} of length "
                    f"{int(lengths[bad])}"
                )
            out[:, column] = torch.where(too_long, UNDEFINED, spec)
        else:
            if named is None or len(named) != batch:
                raise PositionError(
                    f"named position {spec!r} needs one positions dict per prompt "
                    f"(got {None if named is None else len(named)} for {batch} prompts)"
                )
            for row, names in enumerate(named):
                if spec not in names:
                    raise PositionError(
                        f"prompt {row} has no named position {spec!r} (has {sorted(names)})"
                    )
                index = int(names[spec])
                if not 0 <= index < int(lengths[row]):
                    raise PositionError(
                        f"named position {spec!r}={index} is out of range for prompt {row} "
                        f"of length {int(lengths[row])}"
                    )
                out[row, column] = index
    return out


def check_aligned(
    clean_lengths: Int[torch.Tensor, " batch"],
    corrupt_lengths: Int[torch.Tensor, " batch"],
) -> None:
    """Clean and corrupted prompts must have equal token lengths, pair by pair.

    Patching copies activations position by position, so a length mismatch
    would silently pair unrelated tokens.
    """
    if clean_lengths.shape != corrupt_lengths.shape:
        raise PositionError(
            f"{clean_lengths.shape[0]} clean prompts but {corrupt_lengths.shape[0]} corrupted"
        )
    differ = clean_lengths != corrupt_lengths
    if bool(differ.any()):
        row = int(torch.nonzero(differ)[0, 0])
        raise PositionError(
            f"clean and corrupted prompt {row} have different token lengths "
            f"({int(clean_lengths[row])} vs {int(corrupt_lengths[row])}); give them equal "
            "lengths (e.g. ABC-style corruption with single-token names): patching pairs "
            "positions one to one and no explicit position mapping is supported"
        )
