"""Shared test helpers: locate the repository's single-file scripts and import them by path."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests run on the CPU with few threads: keeps the 2-core CI machine responsive and results stable.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MUJOCO_GL", "disable")


def pytest_configure(config):
    # One torch thread for the whole session: on a loaded 2-core machine two threads per process
    # collapse under contention (a fine-tuning test went from 3 s to 110 s).
    import torch

    torch.set_num_threads(1)


def scripts_defining(name: str) -> list[str]:
    """Top-level scripts of the repository that define a module-level function `name` (by AST, no import)."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body):
            found.append(path.stem)
    return found


def load_script(stem: str):
    """Import ROOT/<stem>.py as a module (importing runs nothing: the loop sits under __main__)."""
    if stem in sys.modules:
        return sys.modules[stem]
    spec = importlib.util.spec_from_file_location(stem, ROOT / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def root() -> Path:
    return ROOT
