"""The shape of the three scripts (issues 10 and 17): formatted line budgets, the algorithm before
the plumbing, the one line where X-QL departs from its baseline early in the file, the shared names,
plain Python, a small diff between the two online scripts, and importing a script runs nothing.

All checks read the source (text, AST, the formatter); only the import check runs the scripts, in
subprocesses. The scripts are kept formatted by `make test` (`ruff format --check`), so a line count
here is a formatted line count: packing lines does not pay.
"""

from __future__ import annotations

import ast
import difflib
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ("xsac_continuous", "xtd3_continuous", "xql_offline")
# Formatted lines (ruff format, line length 100), whole file and main(). Issue 17 asked for
# 620 / 590 / 1000 with about 30 lines of online resume; exact resume of the episodes in
# progress (issue 18) took about 70 per script and the kept features the rest: these bounds are
# the measured sizes rounded up to the next 10 (docs/deviations.md, "Line budgets").
FILE_BUDGET = {"xsac_continuous": 710, "xtd3_continuous": 680, "xql_offline": 1090}
MAIN_BUDGET = 150
LINE_LENGTH = 100  # the formatter's (pyproject.toml [tool.ruff])
# The line that says "the one change from ..." sits in the first 40% of the file.
CHANGE_POSITION = 0.4
# `diff xsac_continuous.py xtd3_continuous.py | wc -l` (GNU diff's normal format, counted by
# online_diff_size below): the algorithm differs, the plumbing does not.
ONLINE_DIFF_BOUND = 320
PLUMBING_HEADING = "# ---- plumbing:"
SHARED_NAMES = [
    "Args",
    "make_env",
    "evaluate",
    "gumbel_loss",
    "ReplayBuffer",
    "Actor",
    "TwinCritic",
]
SHARED_NAMES += ["save_checkpoint", "load_checkpoint", "update", "main"]
METHOD = ["gumbel_loss", "Actor", "TwinCritic", "update", "main"]  # before the plumbing


def source(name: str) -> str:
    return (ROOT / f"{name}.py").read_text()


def top_level(name: str) -> dict[str, ast.AST]:
    tree = ast.parse(source(name))
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def formatted(name: str) -> str:
    """The script as `ruff format --line-length 100` leaves it (ruff from the venv or PATH)."""
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    done = subprocess.run(
        [ruff, "format", "--line-length", str(LINE_LENGTH), "--stdin-filename", f"{name}.py", "-"],
        input=source(name),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_file_is_formatted_so_counts_are_formatted_counts(name):
    assert formatted(name) == source(name), f"{name}.py is not formatted: run `make format`"


@pytest.mark.parametrize("name", SCRIPTS)
def test_line_budgets_of_the_formatted_file(name):
    lines = formatted(name).count("\n")
    assert lines <= FILE_BUDGET[name], f"{name}.py: {lines} formatted lines > {FILE_BUDGET[name]}"
    main = top_level(name)["main"]
    length = main.end_lineno - main.lineno + 1
    assert length <= MAIN_BUDGET, f"{name}.py: main() has {length} lines > {MAIN_BUDGET}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_lines_within_the_formatters_length(name):
    long = [i for i, line in enumerate(source(name).splitlines(), 1) if len(line) > LINE_LENGTH]
    assert not long, f"{name}.py: lines longer than {LINE_LENGTH} characters: {long}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_one_change_sits_early_in_update(name):
    """Exactly one line says "the one change from ...", inside the update, in the first 40%."""
    lines = source(name).splitlines()
    marks = [i for i, line in enumerate(lines, 1) if "the one change from" in line]
    assert len(marks) == 1, f"{name}.py: lines marking the one change: {marks}"
    assert marks[0] <= CHANGE_POSITION * len(lines), (name, marks[0], len(lines))
    inside = [n for n in top_level(name).values() if n.lineno <= marks[0] <= n.end_lineno]
    assert inside and inside[0].name.startswith("update"), (name, [n.name for n in inside])


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_algorithm_comes_before_the_plumbing(name):
    """After Args and its tables: the loss, the networks, the update and main(); then one heading
    comment, and every other function and class below it."""
    text = source(name)
    headings = [
        i for i, line in enumerate(text.splitlines(), 1) if line.startswith(PLUMBING_HEADING)
    ]
    assert len(headings) == 1, f"{name}.py: {len(headings)} plumbing headings"
    defined = top_level(name)
    for wanted in METHOD:
        assert defined[wanted].lineno < headings[0], f"{name}.py: {wanted} below the plumbing"
    order = [defined[wanted].lineno for wanted in METHOD]
    assert order == sorted(order), f"{name}.py: not in the order {METHOD}"
    assert defined["Args"].lineno < defined["gumbel_loss"].lineno
    after_main = [n for n in defined.values() if n.lineno > defined["main"].lineno]
    assert all(n.lineno > headings[0] for n in after_main)
    assert len(after_main) >= 8  # the plumbing is below, not in front of the method


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_names_at_module_level(name):
    defined = top_level(name)
    for wanted in SHARED_NAMES + (["Value"] if name != "xtd3_continuous" else []):
        assert wanted in defined, f"{name}.py: no module-level {wanted}"
    for wanted in ("Args", "ReplayBuffer", "Actor", "TwinCritic"):
        assert isinstance(defined[wanted], ast.ClassDef), f"{name}.py: {wanted} is not a class"


def named_lambdas(tree: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda)
    ]


@pytest.mark.parametrize("name", SCRIPTS)
def test_plain_python(name):
    """STYLE.md's plain Python, where a machine can tell: no named lambdas (no `noqa: E731`), no
    tuple of values zipped with a separate tuple of tags (losses go by name), no private torch API,
    no `x and f(x)` / list-slicing tricks as control flow."""
    text = source(name)
    tree = ast.parse(text)
    assert not named_lambdas(tree), f"{name}.py: named lambdas at lines {named_lambdas(tree)}"
    assert "noqa: E731" not in text
    assert "LOSS_TAGS" not in text and "torch.stack([q_loss" not in text
    private = [i for i, line in enumerate(text.splitlines(), 1) if "torch._" in line]
    assert not private, f"{name}.py: private torch API at lines {private}"
    assert "][:layer_norm]" not in text and "*[nn.LayerNorm" not in text
    update = top_level(name)["update"]
    returns = [n for n in ast.walk(update) if isinstance(n, ast.Return)]
    assert returns and all(
        isinstance(n.value, (ast.Dict, ast.DictComp, ast.Name)) for n in returns
    ), f"{name}.py: update must return its losses as a dict keyed by tag"


def online_diff_size(a: str, b: str) -> int:
    """Lines of `diff a b` in its normal format: per hunk one header (e.g. `12,14c12,13`), the `<`
    and `>` lines and, for a change, the `---` separator."""
    old, new = a.splitlines(), b.splitlines()
    size = 0
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            size += 1 + (i2 - i1) + (j2 - j1) + (tag == "replace")
    return size


def test_online_diff_size_helper_counts_like_diff():
    assert online_diff_size("a\nb\nc\n", "a\nb\nc\n") == 0
    assert online_diff_size("a\nb\nc\n", "a\nx\nc\n") == 4  # 2c2, < b, ---, > x
    assert online_diff_size("a\nc\n", "a\nb\nc\n") == 2  # 1a2, > b
    assert online_diff_size("a\nb\nb2\nc\n", "a\nc\n") == 3  # 2,3d1, < b, < b2


def test_diff_between_online_scripts_shows_the_algorithm_only():
    """`diff xsac_continuous.py xtd3_continuous.py` stays small, and none of it falls below the
    plumbing heading but the lines that name each script's policy or arm."""
    a, b = source("xsac_continuous"), source("xtd3_continuous")
    size = online_diff_size(a, b)
    assert size <= ONLINE_DIFF_BOUND, f"diff xsac_continuous.py xtd3_continuous.py: {size} lines"
    plumbing_a = a[a.index(PLUMBING_HEADING) :].splitlines()
    plumbing_b = b[b.index(PLUMBING_HEADING) :].splitlines()
    changed = [line for line in difflib.ndiff(plumbing_a, plumbing_b) if line[:2] in ("- ", "+ ")]
    assert len(changed) <= 40, "\n".join(changed)


def test_importing_a_script_runs_nothing(tmp_path):
    """`import <script>` (a fresh interpreter, headless, an empty folder, `--help` in sys.argv so
    that a CLI parsed at import would print and exit) prints nothing, exits 0, writes nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    code = (
        "import importlib.util, sys; name, path = sys.argv[1], sys.argv[2]; "
        "sys.argv[1:] = ['--help']; spec = importlib.util.spec_from_file_location(name, path); "
        "module = importlib.util.module_from_spec(spec); sys.modules[name] = module; "
        "spec.loader.exec_module(module); assert callable(module.main)"
    )
    procs = {}
    for name in SCRIPTS:  # in parallel: each import takes a few seconds (torch, gymnasium)
        cwd = tmp_path / name
        cwd.mkdir()
        command = [sys.executable, "-c", code, name, str(ROOT / f"{name}.py")]
        procs[name] = (
            cwd,
            subprocess.Popen(
                command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            ),
        )
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
        segments[name] = ast.get_source_segment(source(name), top_level(name)["TwinCritic"])
    first = segments[SCRIPTS[0]]
    assert "class TwinCritic" in first and len(first.splitlines()) > 3
    for name, segment in segments.items():
        assert segment == first, name
