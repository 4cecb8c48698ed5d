"""Imports go one way: services → pipelines → schemas; hook names are spelled in one place.

schemas/ imports no torch and no other layer; pipelines/ imports no ray,
zarr, fastapi or services; nothing imports a bare top-level layer name.
TransformerLens hook names are written only in schemas/hooks.py (HookSite,
block_hook and its model-level constants); everywhere else asks it.
"""

from __future__ import annotations

import ast
import re
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


# A string literal that is (or starts) a TransformerLens hook name: per-block
# names, f-string pieces like f"blocks.{layer}...", and the model-level hooks.
HOOK_NAME_LITERAL = re.compile(r"^(blocks\.|ln_final\.|hook_embed$|hook_pos_embed$)")
HOOK_NAMES_HOME = ROOT / "schemas" / "hooks.py"


def _hook_name_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, scopes) and node.body and isinstance(node.body[0], ast.Expr)
    }
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(tree)  # f-string pieces are Constant nodes too
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings  # prose may name hooks
        and HOOK_NAME_LITERAL.match(node.value)
    )


def test_hook_names_are_spelled_only_in_schemas_hooks() -> None:
    folders = [ROOT / layer for layer in LAYERS] + [ROOT / "circuitscan"]
    bad = [
        f"{path.relative_to(ROOT)}:{lineno} spells hook name {value!r}: use HookSite/block_hook"
        for folder in folders
        for path in sorted(folder.rglob("*.py"))
        if path != HOOK_NAMES_HOME
        for lineno, value in _hook_name_literals(path)
    ]
    assert bad == []


def test_hook_name_checker_sees_literals(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(
        '"""blocks.0.attn.hook_z in a docstring is prose."""\n'
        'name = f"blocks.{layer}.attn.hook_pattern"\n'
        'final = "ln_final.hook_scale"\n'
        'embed = "hook_embed"\n'
        'sae = f"{name}.hook_sae_acts_post"\n'
    )
    assert _hook_name_literals(sample) == [
        (2, "blocks."),
        (3, "ln_final.hook_scale"),
        (4, "hook_embed"),
    ]
    assert _hook_name_literals(HOOK_NAMES_HOME)  # where they are allowed, they are found


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
