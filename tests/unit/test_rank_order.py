"""The packed-key top-K order equals the four-key lexsort it replaced, ties included."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from circuitscan.services.store.rank_order import ranked_order, top_k_per_feature


def _reference(feature, value, prompt, position, magnitude):
    score = np.abs(value) if magnitude else value
    return np.lexsort((position, prompt, -score.astype(np.float64), feature))


def _case(rng: np.random.Generator, dtype, ties: str):
    n = int(rng.integers(1, 3000))
    feature = rng.integers(0, int(rng.integers(1, 200)), n)
    if ties == "copies":  # the same values under other prompts, as byte-copied shards give
        base = rng.standard_normal(max(n // 8, 1)).astype(dtype)
        value = base[rng.integers(0, len(base), n)]
    elif ties == "near":  # float64 values that round to one float32
        value = (1.0 + rng.integers(0, 4, n) * 2.0**-40).astype(np.float64) * rng.choice([-1, 1], n)
    elif ties == "zeros":
        value = rng.choice(np.array([0.0, -0.0, 1.5, -1.5], dtype=dtype), n)
    else:
        value = rng.standard_normal(n).astype(dtype)
    prompt = rng.integers(0, int(rng.integers(1, 10**6)), n)
    position = rng.integers(0, int(rng.integers(1, 300)), n)
    return feature, value.astype(dtype), prompt, position


@pytest.mark.parametrize("ties", ["none", "copies", "near", "zeros"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("magnitude", [False, True])
def test_order_equals_lexsort(ties: str, dtype, magnitude: bool) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{ties}/{np.dtype(dtype)}/{magnitude}".encode()))
    for _ in range(25):
        feature, value, prompt, position = _case(rng, dtype, ties)
        got = ranked_order(feature, value, prompt, position, magnitude=magnitude)
        want = _reference(feature, value, prompt, position, magnitude)
        # Entries equal in every key may come in either order: compare the keys.
        for column in (feature, value, prompt, position):
            np.testing.assert_array_equal(column[got], column[want])


def test_fallbacks_nan_and_huge_values() -> None:
    rng = np.random.default_rng(3)
    feature = rng.integers(0, 5, 500)
    value = rng.standard_normal(500) * 1e300  # beyond float32: inf when rounded
    value[::7] = np.nan
    prompt, position = rng.integers(0, 50, 500), rng.integers(0, 5, 500)
    for magnitude in (False, True):
        got = ranked_order(feature, value, prompt, position, magnitude=magnitude)
        want = _reference(feature, value, prompt, position, magnitude)
        np.testing.assert_array_equal(got, want)
    value = value.copy()
    value[np.isnan(value)] = 2.0
    got = ranked_order(feature, value, prompt, position)
    want = _reference(feature, value, prompt, position, False)
    for column in (feature, value, prompt, position):
        np.testing.assert_array_equal(column[got], column[want])


def test_top_k_per_feature() -> None:
    feature = np.array([2, 0, 2, 2, 0, 1])
    value = np.array([1.0, 5.0, 3.0, 3.0, -6.0, 0.0])
    prompt = np.array([0, 1, 9, 4, 2, 3])
    position = np.zeros(6, dtype=np.int64)
    assert top_k_per_feature(feature, value, prompt, position, 2).tolist() == [1, 4, 5, 3, 2]
    by_size = top_k_per_feature(feature, value, prompt, position, 1, magnitude=True)
    assert by_size.tolist() == [4, 5, 3]
    assert top_k_per_feature(feature[:0], value[:0], prompt[:0], position[:0], 3).size == 0
