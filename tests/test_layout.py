"""The package layout holds: no import cycle between modules, tpa_model knows nothing of HTTP, no module past
650 lines, and the rooms of tpa_model hold the modules (at most six directly in it).

Imports are read from the source with ast, imports inside functions included; those under `if TYPE_CHECKING:`
are not imports at run time and are left out. `from pkg import name` depends on pkg.name where that is a
module, else on pkg itself (its __init__)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tpa_model", "server")
MAX_LINES = 650
HTTP_LIBRARIES = ("fastapi", "starlette", "uvicorn", "httpx", "server")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages under root."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _import_nodes(tree: ast.AST):
    """Every Import and ImportFrom, at any depth, except the bodies of `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            for other in node.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imported_names(name: str, path: Path) -> set[str]:
    """Absolute names of everything the module imports (modules, or attributes of modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {name: {m for m in map(owner, imported_names(name, path)) if m and m != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(import_graph(module_files(ROOT))) == []


def test_the_cycle_finder_sees_cycles_through_function_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found; a TYPE_CHECKING import and
    `from pkg import submodule` (which needs the submodule, not the package's __init__) close none."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from .sub import b\nA = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import C\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    modules = module_files(tmp_path, ("pkg",))
    assert cycles(import_graph(modules)) == []
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(modules)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_tpa_model_knows_nothing_of_http():
    offenders = {
        name: sorted(n for n in imported_names(name, path) if n.split(".")[0] in HTTP_LIBRARIES)
        for name, path in module_files(ROOT, ("tpa_model",)).items()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_650_lines(package):
    lengths = {name: len(path.read_text().splitlines()) for name, path in module_files(ROOT, (package,)).items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_tpa_model_modules_live_in_rooms():
    """Sampling, generation and the CLIs may stay at the top; everything else is in a room that names its job."""
    top = sorted(p.name for p in (ROOT / "tpa_model").glob("*.py"))
    assert len(top) <= 6, top
    rooms = sorted(p.parent.name for p in (ROOT / "tpa_model").glob("*/__init__.py"))
    assert rooms == ["cache", "checkpoints", "compression", "evaluation", "model", "tokenizers"]


def test_test_files_have_unique_names():
    """Test folders are not packages, so pytest imports each test file by its bare name: two files of one name
    in different folders would collide."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_public_names_from_the_package():
    import tpa_model

    for name in tpa_model.__all__:
        assert getattr(tpa_model, name) is not None, name
