"""The layering, enforced: tinytlm/ and kernels/ import nothing above them, no module edits sys.path, and
no two modules of tinytlm/ and kernels/ import each other, directly or round a longer cycle.

Layers, bottom up: kernels/ (Triton kernels, their wrappers and plain-torch references; imports only
torch and triton) < tinytlm/ (the library: data, model, training loops, paper runner) < the scripts
(train_mlm.py, train_cls.py, ensemble.py, data_prep/*.py: thin command lines) and bench/, tests/.
Within the package the modules form a DAG: every import counts, a function-local one included (it
only hides a cycle from the import system; a reader still has to hold both modules at once).
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


def import_graph(root: Path, packages=("tinytlm", "kernels")) -> dict:
    """{module: [(imported module, file:line)]} over the modules of `packages` under root, every import
    (function-local ones included) resolved to the package's own modules; `tinytlm.kernels.x` (the installed
    name of kernels/) is kernels.x."""
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))]
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}

    def own(name):
        name = name.replace("tinytlm.kernels", "kernels", 1) if name.startswith("tinytlm.kernels") else name
        while name and name not in modules:
            name = name.rpartition(".")[0]  # `from tinytlm.model import X`: X is a name in tinytlm.model
        return name

    graph = {}
    for name, p in modules.items():
        edges = []
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]  # a submodule, or a name of the module
            else:
                continue
            edges += [(t, f"{p.relative_to(root)}:{node.lineno}") for t in map(own, targets) if t and t != name]
        graph[name] = list(dict.fromkeys(edges))  # `from m import a, b`: one edge
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each as its sorted module names
    and the imports that close it ("file:line -> module")."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or v not in comp:
                comp.add(stack.pop())
            on_stack.difference_update(comp)
            if len(comp) > 1:
                closing = [f"{where} -> {w}" for u in sorted(comp) for w, where in graph[u] if w in comp]
                out.append((sorted(comp), closing))

    for v in sorted(graph):
        if v not in index:
            visit(v)
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


def test_no_import_cycle_in_the_package():
    """No cycle between the modules of tinytlm/ and kernels/; a failure names every import that closes one."""
    found = cycles(import_graph(REPO))
    assert not found, "\n".join(f"cycle {' <-> '.join(mods)}: " + "; ".join(edges) for mods, edges in found)


def test_the_cycle_check_sees_local_imports(tmp_path):
    """A cycle closed by a function-local import, through three modules, is found (so the test above can fail)."""
    pkg = tmp_path / "tinytlm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tinytlm.b import f\n")
    (pkg / "b.py").write_text("import torch\nfrom tinytlm import c\n")
    (pkg / "c.py").write_text("def g():\n    from tinytlm.a import h\n")
    (pkg / "d.py").write_text("import tinytlm.a\n")  # imports into the cycle, not part of it
    (found_mods, edges), = cycles(import_graph(tmp_path, ("tinytlm",)))
    assert found_mods == ["tinytlm.a", "tinytlm.b", "tinytlm.c"]
    assert edges == ["tinytlm/a.py:1 -> tinytlm.b", "tinytlm/b.py:2 -> tinytlm.c", "tinytlm/c.py:2 -> tinytlm.a"]
