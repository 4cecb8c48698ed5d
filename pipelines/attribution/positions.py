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
            "lengths (e.g. ABC-style corruption with single-token names), or pass an explicit "
            "position map (position_map; jobs: align: end)"
        )


def check_position_map(
    position_map: Int[torch.Tensor, "batch seq"],
    clean_shape: tuple[int, int],
    clean_lengths: Int[torch.Tensor, " batch"],
    corrupt_lengths: Int[torch.Tensor, " batch"],
) -> Int[torch.Tensor, "batch seq"]:
    """Validate an explicit clean → corrupted position map; padding entries become UNDEFINED.

    ``position_map[b, t]`` is the corrupted-prompt position whose activations
    patch clean position ``t`` of prompt ``b``; ``UNDEFINED`` (-1) marks a
    clean position with no counterpart, which is never patched (Δ = 0).
    """
    if tuple(position_map.shape) != tuple(clean_shape):
        raise PositionError(
            f"the position map must be [batch, seq] like the clean tokens {tuple(clean_shape)}, "
            f"got {tuple(position_map.shape)}"
        )
    if corrupt_lengths.shape != clean_lengths.shape:
        raise PositionError(
            f"{clean_lengths.shape[0]} clean prompts but {corrupt_lengths.shape[0]} corrupted"
        )
    position_map = position_map.long().cpu()
    real = torch.arange(clean_shape[1])[None, :] < clean_lengths.cpu()[:, None]
    bad = real & ((position_map < UNDEFINED) | (position_map >= corrupt_lengths.cpu()[:, None]))
    if bool(bad.any()):
        row, column = (int(i) for i in torch.nonzero(bad)[0])
        raise PositionError(
            f"position map: clean prompt {row} position {column} maps to "
            f"{int(position_map[row, column])}, outside its corrupted prompt of length "
            f"{int(corrupt_lengths[row])} (use -1 for no counterpart)"
        )
    return torch.where(real, position_map, UNDEFINED)


def end_aligned_map(
    clean_lengths: Int[torch.Tensor, " batch"],
    corrupt_lengths: Int[torch.Tensor, " batch"],
    seq: int,
) -> Int[torch.Tensor, "batch seq"]:
    """Pair positions counted from the end (BOS with BOS): prompts that differ in length
    only early on, e.g. a longer corrupted preamble, keep their final tokens paired."""
    clean_lengths, corrupt_lengths = clean_lengths.cpu(), corrupt_lengths.cpu()
    steps = torch.arange(seq)[None, :]
    mapped = steps + (corrupt_lengths - clean_lengths)[:, None]
    valid = (steps >= 1) & (mapped >= 1) & (steps < clean_lengths[:, None])
    out = torch.where(valid, mapped, UNDEFINED)
    out[:, 0] = 0
    return out


def remap_positions(
    values: torch.Tensor,
    position_map: Int[torch.Tensor, "batch seq"],
    fill: torch.Tensor,
) -> torch.Tensor:
    """Corrupted-run ``[batch, seq_c, ...]`` values moved to clean positions.

    Where the map is UNDEFINED the clean value ``fill`` ([batch, seq, ...]) is
    kept, so those positions are not patched.
    """
    index = position_map.to(values.device).clamp(min=0)
    rows = torch.arange(values.shape[0], device=values.device)[:, None]
    gathered = values[rows, index]
    keep = (position_map >= 0).to(values.device).reshape(*index.shape, *[1] * (values.ndim - 2))
    return torch.where(keep, gathered, fill.to(gathered.dtype))
