"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for tiny float64 models: they gain nothing from more, and on a
    loaded 2-core machine two threads spin against each other (the 20-seed calibration
    took ~17 s with two threads and ~1 s with one, side by side)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
