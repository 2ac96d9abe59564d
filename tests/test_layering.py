"""The layering, enforced: tinytlm/ and kernels/ import nothing above them, and no module edits sys.path.

Layers, bottom up: kernels/ (Triton kernels, their wrappers and plain-torch references; imports only
torch and triton) < tinytlm/ (the library: data, model, training loops, paper runner) < the scripts
(train_mlm.py, train_cls.py, ensemble.py, data_prep/*.py: thin command lines) and bench/, tests/.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


ABOVE = {"train_mlm", "train_cls", "ensemble", "data_prep", "bench", "tests"}


def imported(path: Path) -> list:
    """(line, top-level module) of every import in the file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def python_files(*folders) -> list:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


@pytest.mark.parametrize("layer, forbidden", [("tinytlm", ABOVE), ("kernels", ABOVE | {"tinytlm"})])
def test_no_import_from_a_layer_above(layer, forbidden):
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in python_files(layer)
           for line, mod in imported(p) if mod in forbidden]
    assert not bad, bad


def test_no_module_edits_sys_path():
    files = python_files("tinytlm", "kernels", "data_prep", "bench", "tests") + sorted(REPO.glob("*.py"))
    bad = [f"{p.relative_to(REPO)}:{n.lineno}" for p in files for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
           and n.value.id == "sys"]
    assert not bad, bad


def test_the_checker_sees_local_imports(tmp_path):
    """The walk finds an import hidden in a function, so the test above can fail."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from train_mlm import train\n    import bench.common\n")
    assert imported(p) == [(2, "train_mlm"), (3, "bench")]
