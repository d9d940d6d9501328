"""The import rules of docs/layers.md, checked on every module of every layer."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

ALLOWED: dict[str, set[str]] = {
    "dda_kernel": {"torch", "dda_kernel"},
    "storage": {"lancedb", "lance", "duckdb", "pyarrow", "pydantic", "numpy", "filelock", "storage"},
    "tasks": {
        "torch",
        "transformers",
        "peft",
        "tokenizers",
        "safetensors",
        "numpy",
        "matplotlib",
        "tqdm",
        "pydantic",
        "storage",
        "dda_kernel",
        "tasks",
    },
    "flows": {
        "prefect",
        "prefect_dask",
        "openlineage",
        "attr",
        "pydantic",
        "pydantic_settings",
        "tqdm",
        "tasks",
        "storage",
        "dda_kernel",
        "flows",
    },
    "deployments": {"prefect", "flows", "deployments"},
}
# One module beyond its layer's rule: the Trainer callback subclasses transformers' TrainerCallback (the training
# process has transformers already; the callback imports nothing else of the project's heavy parts).
EXCEPTIONS: dict[str, set[str]] = {"flows/callback.py": {"transformers"}}


def imported_roots(path: Path, layer: str) -> set[str]:
    """Top-level package names imported anywhere in ``path`` (a relative import counts as ``layer``)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(layer if node.level else (node.module or "").split(".")[0])
    return roots


def forbidden(path: Path, layer: str) -> set[str]:
    """Imports of ``path`` that are neither the standard library nor allowed for ``layer``."""
    extra = EXCEPTIONS.get(path.relative_to(ROOT).as_posix(), set()) if path.is_relative_to(ROOT) else set()
    return imported_roots(path, layer) - STDLIB - ALLOWED[layer] - extra


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_design_allows(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"layer {layer}/ has no Python file"
    offending = {str(f.relative_to(ROOT)): sorted(forbidden(f, layer)) for f in files if forbidden(f, layer)}
    assert offending == {}


def test_checker_catches_forbidden_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nimport torch.nn\nfrom prefect import flow\nfrom . import sibling\n")
    assert forbidden(probe, "storage") == {"torch", "prefect"}
    assert forbidden(probe, "dda_kernel") == {"prefect"}
    assert forbidden(probe, "flows") == {"torch"}


@pytest.mark.parametrize("layer", ["dda_kernel", "storage", "tasks", "flows"])
def test_no_module_is_over_400_lines(layer):
    """Small modules: one that outgrows 400 lines gets split by what its parts do."""
    long = {p.name: n for p in sorted((ROOT / layer).glob("*.py")) if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
