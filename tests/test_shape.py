"""Structural checks of issue 10 ("the three scripts in one shape, CleanRL-short"): shared names, importing runs
nothing, one TwinCritic, a small diff between the online scripts, CleanRL's line length and the line budgets.

All checks read the source (AST, text); only the import check runs Python, in subprocesses.
"""
from __future__ import annotations

import ast
import difflib
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ("xsac_continuous", "xtd3_continuous", "xql_offline")
CLASSES = ("Args", "ReplayBuffer", "Actor", "TwinCritic")
FUNCTIONS = ("make_env", "evaluate", "gumbel_loss", "save_checkpoint", "load_checkpoint", "main")
HAS_VALUE = ("xsac_continuous", "xql_offline")
# issue 10, "Budgets" (wc -l counts, docstrings included): whole file, main()
FILE_BUDGET = {"xsac_continuous": 550, "xtd3_continuous": 520, "xql_offline": 750}
MAIN_BUDGET = 130
MAX_LINE_LENGTH = 127  # CleanRL's black line length
# Size of `diff xsac_continuous.py xtd3_continuous.py | wc -l` (GNU diff's normal format; online_diff_size below
# counts the same way). Measured 294 at commit bd82c98; the bound is that value rounded up to the next 10.
ONLINE_DIFF_BOUND = 300


def source(name: str) -> str:
    return (ROOT / f"{name}.py").read_text()


def top_level(name: str) -> dict[str, ast.AST]:
    return {node.name: node for node in ast.parse(source(name)).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_names_at_module_level(name):
    """Each script defines the shared names of issue 10 at module level, classes as classes, functions as functions."""
    defined = top_level(name)
    classes = CLASSES + (("Value",) if name in HAS_VALUE else ())
    for wanted in classes:
        assert isinstance(defined.get(wanted), ast.ClassDef), f"{name}.py: no module-level class {wanted}"
    for wanted in FUNCTIONS:
        assert isinstance(defined.get(wanted), ast.FunctionDef), f"{name}.py: no module-level function {wanted}"


def test_importing_a_script_runs_nothing(tmp_path):
    """`import <script>` (in a fresh interpreter, headless, from an empty folder, with `--help` in sys.argv so that a
    CLI parsed at import would print and exit) prints nothing, exits 0 and leaves no run folder or other file."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    code = ("import importlib.util, sys; name, path = sys.argv[1], sys.argv[2]; sys.argv[1:] = ['--help']; "
            "spec = importlib.util.spec_from_file_location(name, path); module = importlib.util.module_from_spec(spec); "
            "sys.modules[name] = module; spec.loader.exec_module(module); assert callable(module.main)")
    procs = {}
    for name in SCRIPTS:  # in parallel: each import takes a few seconds (torch, gymnasium, dm_control)
        cwd = tmp_path / name
        cwd.mkdir()
        procs[name] = (cwd, subprocess.Popen([sys.executable, "-c", code, name, str(ROOT / f"{name}.py")], cwd=cwd,
                                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for name, (cwd, proc) in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, (name, stderr[-2000:])
            assert stdout == "" and stderr == "", (name, stdout[-2000:], stderr[-2000:])
            assert list(cwd.iterdir()) == [], (name, list(cwd.iterdir()))
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_twin_critic_source_identical_in_all_three():
    """One TwinCritic implementation, the same class source in every script."""
    segments = {}
    for name in SCRIPTS:
        text = source(name)
        node = top_level(name)["TwinCritic"]
        segments[name] = ast.get_source_segment(text, node)
    first = segments[SCRIPTS[0]]
    assert "class TwinCritic" in first and len(first.splitlines()) > 3
    for name, segment in segments.items():
        assert segment == first, name + ":\n" + "\n".join(difflib.unified_diff(first.splitlines(), segment.splitlines(),
                                                                               SCRIPTS[0], name, lineterm=""))


def online_diff_size(a: str, b: str) -> int:
    """Lines of `diff a b` in its normal format: per hunk one header (e.g. `12,14c12,13`), the `<` and `>` lines and,
    for a change, the `---` separator."""
    old, new = a.splitlines(), b.splitlines()
    size = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag != "equal":
            size += 1 + (i2 - i1) + (j2 - j1) + (tag == "replace")
    return size


def test_online_diff_size_helper_counts_like_diff():
    assert online_diff_size("a\nb\nc\n", "a\nb\nc\n") == 0
    assert online_diff_size("a\nb\nc\n", "a\nx\nc\n") == 4  # 2c2, < b, ---, > x
    assert online_diff_size("a\nc\n", "a\nb\nc\n") == 2  # 1a2, > b
    assert online_diff_size("a\nb\nb2\nc\n", "a\nc\n") == 3  # 2,3d1, < b, < b2


def test_diff_between_online_scripts_stays_small():
    """`diff xsac_continuous.py xtd3_continuous.py` shows only what differs in the algorithm: at most 300 lines
    (294 at commit bd82c98, rounded up to the next 10)."""
    size = online_diff_size(source("xsac_continuous"), source("xtd3_continuous"))
    assert size <= ONLINE_DIFF_BOUND, f"diff xsac_continuous.py xtd3_continuous.py has {size} lines"


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_line_longer_than_127(name):
    long = [(i, len(line)) for i, line in enumerate(source(name).splitlines(), 1) if len(line) > MAX_LINE_LENGTH]
    assert not long, f"{name}.py: lines longer than {MAX_LINE_LENGTH} characters (line, length): {long}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_line_budgets(name):
    """Issue 10's budgets, as `wc -l` counts (newlines): whole file, and main() from `def main` to its last line."""
    text = source(name)
    assert text.count("\n") <= FILE_BUDGET[name], f"{name}.py has {text.count(chr(10))} lines > {FILE_BUDGET[name]}"
    main = top_level(name)["main"]
    first = min([main.lineno] + [d.lineno for d in main.decorator_list])
    length = main.end_lineno - first + 1
    assert length <= MAIN_BUDGET, f"{name}.py: main() has {length} lines > {MAIN_BUDGET}"
