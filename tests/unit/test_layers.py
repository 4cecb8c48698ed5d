"""Imports go one way: services → pipelines → schemas.

schemas/ imports no torch and no other layer; pipelines/ imports no ray,
zarr, fastapi or services; nothing imports a bare top-level layer name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("schemas", "pipelines", "services")
FORBIDDEN = {
    "schemas": {
        "torch",
        "transformer_lens",
        "sae_lens",
        "ray",
        "zarr",
        "numcodecs",
        "fastapi",
        "circuitscan.pipelines",
        "circuitscan.services",
    },
    "pipelines": {
        "ray",
        "zarr",
        "numcodecs",
        "fastapi",
        "uvicorn",
        "starlette",
        "httpx",
        "requests",
        "circuitscan.services",
    },
    "services": set(),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _violations(layer: str) -> list[str]:
    bad: list[str] = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for lineno, module in _imports(path):
            top = module.split(".")[0]
            if top in LAYERS:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports bare '{module}'")
            for forbidden in FORBIDDEN[layer]:
                if module == forbidden or module.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{lineno} imports '{module}'")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_go_one_way(layer: str) -> None:
    assert _violations(layer) == []


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    # Guard against a checker that silently passes everything.
    sample = tmp_path / "bad.py"
    sample.write_text("import ray\nfrom circuitscan.services import cli\n")
    modules = [module for _, module in _imports(sample)]
    assert modules == ["ray", "circuitscan.services"]
    assert any(m.startswith(f) for m in modules for f in FORBIDDEN["pipelines"])
