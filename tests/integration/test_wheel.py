"""The wheel carries every module of the three layers, under circuitscan.*, and nothing bare."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_wheel_contains_every_module(tmp_path: Path) -> None:
    # Build from a copy so the checkout gets no build/ or egg-info litter.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".circuitscan", "tests"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("circuitscan-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"circuitscan/{path.relative_to(ROOT).as_posix()}"
        for layer in ("schemas", "pipelines", "services")
        for path in (ROOT / layer).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected, "no modules found"
    assert sorted(expected - names) == []
    bare = sorted(n for n in names if n.split("/")[0] in {"schemas", "pipelines", "services"})
    assert bare == []
    assert "circuitscan/__init__.py" not in names  # implicit namespace package
