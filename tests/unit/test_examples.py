"""Every example spec in examples/ is a valid job spec whose files exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from circuitscan.services.jobs.spec_io import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(SPECS) >= 3


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_spec_is_valid(path: Path) -> None:
    spec = load_spec(path)
    source = spec.prompts
    if hasattr(source, "path"):
        assert (ROOT / source.path).is_file(), source.path
