"""Every example spec in examples/ is a valid job spec whose files exist, and the Python API
example runs end to end on the tiny models."""

from __future__ import annotations

import re
import subprocess
import sys
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


def test_python_api_example_runs_on_the_tiny_models(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), "--prompts", "4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.startswith("4 pairs, e.g. ")
    # Ten verified nodes: name, AtP* rank score and estimate, exact delta, all finite numbers.
    number = r"\s+(-?\d+\.\d+)"
    rows = re.findall(r"^((?:z|feature):\S+@END)" + 3 * number + "$", out, re.M)
    assert len(rows) == 10, out
    assert re.search(
        r"^cache: \d+ active \(token, feature\) entries over \d+ tokens at L1\.z$", out, re.M
    )
    assert "sites=['L1.z'], prompts=4" in out
    assert re.search(r"^feature \d+: fires on [1-9]\d* tokens", out, re.M)
