"""Totals summed exactly, so they are the same bytes whatever the order of the shards.

Float addition depends on its order and shards fold into the index in any
order (commit order, fold batches, a restart). Each attribution total
(Σ a·g, Σ |a·g|, a paired cache's AtP sums) is therefore kept as a float64
pair (value, residual): ``value`` is the exact sum rounded to float64, the
number every reader uses, and ``residual`` is the exact sum minus
``value`` (exact as well), kept so that the next additions stay exact.

A shard's contribution c is split into a part on the 2⁻²⁰ grid (``hi``) and
the rest rounded to the 2⁻⁶⁰ grid (``lo``, |lo| ≤ 2⁻²¹). Sums of grid
multiples are exact while they fit in 53 bits: hi parts below 2³³ in
magnitude, lo parts below 2⁻⁷ (over 16,000 shards at once). Adding a batch
to a total is then exact: the total splits back into a hi and a lo part,
each adds its batch's part, and Knuth's TwoSum of the two results gives the
new (value, residual), which is unique for the exact sum. The only rounding
is each contribution's to the 2⁻⁶⁰ grid (≤ 2⁻⁶¹ ≈ 4·10⁻¹⁹ a shard), far
below the 16-bit precision of the stored activations and gradients.

A total past 2³³ (8.6·10⁹) is still summed, but no longer exactly.
"""

from __future__ import annotations

import numpy as np

HI_GRID = 2.0**-20
LO_GRID = 2.0**-60


def _on(values: np.ndarray, grid: float) -> np.ndarray:
    # Division and multiplication by a power of two are exact.
    return np.round(values / grid) * grid


def split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as (hi, lo): hi on the 2⁻²⁰ grid, lo the rest on the 2⁻⁶⁰ grid."""
    values = np.asarray(values, dtype=np.float64)
    hi = _on(values, HI_GRID)
    return hi, _on(values - hi, LO_GRID)  # values - hi is exact below 2**33


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fl(a + b), the rounding error), the error exact (Knuth's TwoSum)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def add_exact(
    value: np.ndarray,
    residual: np.ndarray,
    rows: np.ndarray,
    contributions: np.ndarray,
) -> None:
    """Add ``contributions`` (float64, one per entry of ``rows``, rows may repeat) to the
    totals ``value`` + ``residual`` of their rows, exactly (in place)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return
    hi, lo = split(contributions)
    if np.all(rows[1:] > rows[:-1]):  # distinct and in order (one shard, or dense)
        touched, batch_hi, batch_lo = rows, hi, lo
    else:  # no sort: the totals are dense arrays, and bincount sums grid multiples exactly
        touched = np.flatnonzero(np.bincount(rows, minlength=len(value)))
        batch_hi = np.bincount(rows, weights=hi, minlength=len(value))[touched]
        batch_lo = np.bincount(rows, weights=lo, minlength=len(value))[touched]
    old_value, old_residual = value[touched], residual[touched]
    old_hi = _on(old_value, HI_GRID)
    old_lo = (old_value - old_hi) + old_residual  # both exact: multiples of 2**-60
    value[touched], residual[touched] = _two_sum(old_hi + batch_hi, old_lo + batch_lo)
