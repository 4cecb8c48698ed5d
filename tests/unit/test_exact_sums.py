"""Exact totals: (value, residual) pairs whose sums do not depend on order or batches."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from circuitscan.services.store.exact_sums import LO_GRID, add_exact, split

ROWS = 50


def _contributions(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shards' per-row contributions over 18 orders of magnitude, both signs, rows repeating."""
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, ROWS, 30), rng.standard_normal(30) * 10.0 ** rng.integers(-12, 6, 30))
        for _ in range(40)
    ]


def _folded(shards: list[tuple[np.ndarray, np.ndarray]], seed: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    value, residual = np.zeros(ROWS), np.zeros(ROWS)
    order, start = rng.permutation(len(shards)), 0
    while start < len(order):
        batch = [shards[i] for i in order[start : start + int(rng.integers(1, 8))]]
        start += len(batch)
        rows = np.concatenate([rows for rows, _ in batch])
        add_exact(value, residual, rows, np.concatenate([c for _, c in batch]))
    return value.tobytes(), residual.tobytes()


def test_the_sum_is_the_same_bytes_in_any_order_and_batches() -> None:
    shards = _contributions(0)
    assert len({_folded(shards, seed) for seed in range(8)}) == 1
    naive = set()
    for seed in range(8):  # plain float addition of the same contributions does differ
        total = np.zeros(ROWS)
        for i in np.random.default_rng(seed).permutation(len(shards)):
            np.add.at(total, shards[i][0], shards[i][1])
        naive.add(total.tobytes())
    assert len(naive) > 1


def test_value_is_the_exact_sum_rounded_once_and_residual_the_rest() -> None:
    shards = _contributions(1)
    raw_value, raw_residual = _folded(shards, 0)
    value, residual = np.frombuffer(raw_value), np.frombuffer(raw_residual)
    exact, split_exact = [Fraction(0)] * ROWS, [Fraction(0)] * ROWS
    for rows, contributions in shards:
        hi, lo = split(contributions)
        for row, c, h, low in zip(rows, contributions, hi, lo, strict=True):
            exact[row] += Fraction(float(c))
            split_exact[row] += Fraction(float(h)) + Fraction(float(low))
    for row in range(ROWS):
        assert Fraction(float(value[row])) + Fraction(float(residual[row])) == split_exact[row]
        assert value[row] == float(split_exact[row])  # correctly rounded
        # Each contribution moved by at most half the 2**-60 grid.
        assert abs(split_exact[row] - exact[row]) <= Fraction(LO_GRID) / 2 * 40 * 30


def test_adding_nothing_or_zeros_changes_no_byte() -> None:
    value, residual = np.zeros(4), np.zeros(4)
    add_exact(value, residual, np.array([0, 2, 2]), np.array([1e-9, 3.0, -1e-17]))
    before = value.tobytes(), residual.tobytes()
    add_exact(value, residual, np.array([], dtype=np.int64), np.array([]))
    add_exact(value, residual, np.arange(4), np.zeros(4))
    assert (value.tobytes(), residual.tobytes()) == before
    assert not np.signbit(value).any()  # no -0.0 from adding zeros
