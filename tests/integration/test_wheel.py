"""The wheel carries the circuitscan package and every module of the three layers under it,
and nothing bare."""

from __future__ import annotations

import os
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
    # The package's own folder: the top-level API and circuitscan.testing.
    expected |= {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "circuitscan").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected, "no modules found"
    assert {"circuitscan/__init__.py", "circuitscan/testing/__init__.py"} <= expected
    assert sorted(expected - names) == []
    bare = sorted(n for n in names if n.split("/")[0] in {"schemas", "pipelines", "services"})
    assert bare == []

    # Unpacked on the path ahead of the checkout's editable install, the wheel's
    # own package answers `import circuitscan as cs` and reaches every layer.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    check = (
        "import sys, circuitscan as cs\n"
        "assert 'torch' not in sys.modules\n"
        f"assert cs.__file__.startswith({str(unpacked)!r}), cs.__file__\n"
        "import circuitscan.services.cli, circuitscan.testing\n"
        "assert circuitscan.services.cli.__file__.startswith(cs.__path__[0])\n"
        "print(cs.attribute.__module__)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "circuitscan.attribution"
