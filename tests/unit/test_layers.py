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


# The top-level API (circuitscan/*.py) sits above every layer, and
# circuitscan.testing holds test fixtures: the layers import neither, and the
# API does not import the fixtures.
FRONT_DOOR = ROOT / "circuitscan"


def _above_layers(module: str) -> bool:
    """True for ``circuitscan`` itself and any ``circuitscan.X`` that is not one of the layers."""
    parts = module.split(".")
    return parts[0] == "circuitscan" and (len(parts) == 1 or parts[1] not in LAYERS)


def _is_testing(module: str) -> bool:
    return module == "circuitscan.testing" or module.startswith("circuitscan.testing.")


def test_production_imports_neither_the_api_nor_the_test_fixtures() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{lineno} imports '{module}'"
        for layer in LAYERS
        for path in sorted((ROOT / layer).rglob("*.py"))
        for lineno, module in _imports(path)
        if _above_layers(module)
    ]
    bad += [
        f"{path.relative_to(ROOT)}:{lineno} imports test fixtures '{module}'"
        for path in sorted(FRONT_DOOR.rglob("*.py"))
        if "testing" not in path.relative_to(FRONT_DOOR).parts
        for lineno, module in _imports(path)
        if _is_testing(module)
    ]
    assert bad == []


def test_api_checker_sees_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(
        "from circuitscan.testing import build_tiny_model\n"
        "from circuitscan import attribute\n"
        "import circuitscan.stores\n"
        "from circuitscan.schemas.hooks import HookSite\n"
    )
    flagged = [module for _, module in _imports(sample) if _above_layers(module)]
    assert flagged == ["circuitscan.testing", "circuitscan", "circuitscan.stores"]
    assert [m for _, m in _imports(sample) if _is_testing(m)] == ["circuitscan.testing"]
