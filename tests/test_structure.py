"""The size rules, enforced: no function in tinytlm/ or kernels/ is over 100 lines or nests its compound
statements (for, while, if, with, try) deeper than 4, no line of the repository's Python or shell is over 120
characters, and CI cannot go green with the data-dependent tests skipped."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 100
MAX_DEPTH = 4
MAX_WIDTH = 120
BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try, ast.Match)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def depth(node, level=0) -> int:
    """The deepest nesting of compound statements under node; a nested function starts again at 0
    (it is measured as a function of its own). An `elif` is its `if`'s sibling, not its child."""
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, FUNCTIONS + (ast.ClassDef, ast.Lambda)):
            continue
        elif_ = isinstance(node, ast.If) and isinstance(child, ast.If) and node.orelse == [child]
        nested = isinstance(child, BLOCKS) and not elif_
        deepest = max(deepest, depth(child, level + nested))
    return deepest


def functions(*folders):
    """(where, lines, nesting) of every function and method in the folders' Python files."""
    for path in sorted(p for f in folders for p in (REPO / f).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, FUNCTIONS):
                where = f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
                yield where, node.end_lineno - node.lineno + 1, depth(node)


def test_depth_counts_nesting():
    tree = ast.parse("def f():\n for a in b:\n  if a:\n   pass\n  elif c:\n   with d:\n    pass\n")
    assert depth(tree.body[0]) == 3


def test_functions_are_short():
    long = [f"{w}: {n} lines" for w, n, _ in functions("tinytlm", "kernels") if n > MAX_LINES]
    assert not long, long


def test_functions_are_shallow():
    deep = [f"{w}: nesting {d}" for w, _, d in functions("tinytlm", "kernels") if d > MAX_DEPTH]
    assert not deep, deep


def test_lines_are_narrow():
    """Every tracked .py and .sh file (git ls-files; a tarball without git: every such file under the repo)."""
    try:
        names = subprocess.run(["git", "ls-files", "*.py", "*.sh"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.suffix in (".py", ".sh")]
    assert len(names) > 50
    wide = [f"{n}:{i}: {len(line)} characters" for n in names if (REPO / n).is_file()
            for i, line in enumerate((REPO / n).read_text(encoding="utf-8").splitlines(), 1) if len(line) > MAX_WIDTH]
    assert not wide, wide


def test_ci_fails_without_the_data(tmp_path):
    """Under CI=true, a missing data folder ends the run with one line and a nonzero exit, before any test."""
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")  # the suite's conftest, as it is
    env = {**os.environ, "CI": "true", "TINYTLM_RAW": str(tmp_path / "missing")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_one.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]  # (pytest echoes the reason on stderr too)
    assert len(lines) == 1 and "shared data not found" in lines[0] and "missing" in lines[0], r.stdout + r.stderr
