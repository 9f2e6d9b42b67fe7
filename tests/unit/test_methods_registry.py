"""The method registry (llmpress/compress/methods.py): one list of methods, each complete, and an engine that
knows none of them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import llmpress.compress  # noqa: F401 - registers every method
from llmpress.compress.methods import registered
from llmpress.config import METHODS, STAGE_SCHEMAS
from llmpress.loading import read_yaml

REPO = Path(__file__).resolve().parents[2]
COMPRESS = REPO / "llmpress" / "compress"
LEAVES = ("engine", "methods", "calibration", "offload", "records", "targets", "shrink")


def test_every_stage_schema_has_exactly_one_registered_method() -> None:
    methods = registered()
    assert sorted(methods) == sorted(METHODS) and len(METHODS) == len(set(METHODS)) == len(STAGE_SCHEMAS)
    for name, method in methods.items():
        assert method.schema in STAGE_SCHEMAS and method.name == name
        assert method.kind != "layer" or method.statistic in (None, "input_sq_norms", "hessian")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_a_file_a_recipe_a_unit_test_and_a_readme_row(name: str) -> None:
    module = registered()[name].apply.__module__
    assert module == f"llmpress.compress.{name}", f"{name} is registered from {module}, not its own file"
    recipes = [p for p in (REPO / "recipes").glob("*.yaml")
               if any(s.get("method") == name for s in read_yaml(p).get("stages", []))]  # fmt: skip
    assert recipes, f"no recipe in recipes/ uses {name}"
    tests = [p for p in (REPO / "tests" / "unit").glob("test_*.py")
             if re.search(rf"\b{name}\b", p.read_text()) and p.name != Path(__file__).name]  # fmt: skip
    assert tests, f"no unit test mentions {name}"
    readme = (REPO / "README.md").read_text()
    assert re.search(rf"^\| `{name}` \| `{name}\.py` \|", readme, re.M), f"no README row for {name}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_engine_imports_no_method_and_no_method_imports_the_engine() -> None:
    methods = {f"llmpress.compress.{name}" for name in METHODS}
    for leaf in LEAVES:
        assert not _imports(COMPRESS / f"{leaf}.py") & methods, f"{leaf}.py imports a method"
    for name in METHODS:
        assert "llmpress.compress.engine" not in _imports(COMPRESS / f"{name}.py"), f"{name}.py imports the engine"
