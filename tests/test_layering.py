"""Layering: the model package is pure torch; Ray, Hydra/OmegaConf and fsspec belong to pipeline/ only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model"
FORBIDDEN = {"ray", "hydra", "omegaconf", "fsspec"}


def _forbidden_imports(source: str, filename: str) -> list[str]:
    """Every import of a forbidden top-level package, at any depth (function bodies included)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            # importlib.import_module("ray") / __import__("ray")
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        if names:
            assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Call))  # the only nodes that set names
            found += [f"{filename}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def test_model_package_does_not_import_orchestration_libraries() -> None:
    files = sorted(MODEL.rglob("*.py"))
    assert len(files) > 5 and MODEL / "sampling.py" in files
    bad: list[str] = []
    for path in files:
        bad += _forbidden_imports(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not bad, "model/ must not import ray/hydra/omegaconf/fsspec:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "hits"),
    [
        ("import ray", 1),
        ("import ray.data as rd", 1),
        ("from omegaconf import OmegaConf", 1),
        ("def f():\n    from hydra.core import config_store\n", 1),
        ("import os, fsspec", 1),
        ("import importlib\nimportlib.import_module('ray')", 1),
        ("__import__('hydra')", 1),
        ("import rayon\nfrom .ray import x\nimport torch\nfrom fsspec_like import y", 0),
    ],
)
def test_checker_catches_forbidden_imports(source: str, hits: int) -> None:
    assert len(_forbidden_imports(source, "<t>")) == hits
