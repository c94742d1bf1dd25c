"""The package's import graph has no circles: read from the source with ast (relative and absolute imports), once
for what runs at import time and once with the imports inside functions too. Layering: kobattr.io imports no other
kobattr module; the views depend on the result types, and the result reaches the views only through the late
imports listed in LATE_UPWARD."""

import ast
from pathlib import Path

import pytest

import kobattr
import kobattr.kernels

# (importer, imported) -> the functions allowed to make that import, and why it cannot be avoided
LATE_UPWARD = {
    ("kobattr.result", "kobattr.views"): (
        {"_repr_html_", "show", "save_html"},
        "Jupyter displays a result through its own _repr_html_ method; show and save_html are the documented "
        "methods that hand the result to kobattr.views"),
    # from main's on-device tuner (merged late): dispatch asks the tuner, which times the backends' implementations;
    # to be removed by giving the tuner's cache lookup a module of its own below kobattr.backends
    ("kobattr.backends", "kobattr.tuner"): ({"select"}, "auto dispatch asks the tuner's cache for its winner"),
    # the heads report renders the optional gradient section (kobattr heads --gradient), whose module builds on
    # heads' key categories
    ("kobattr.analyses.heads", "kobattr.analyses.gradient"): (
        {"_figures", "_report"}, "write_report draws and summarises results['gradient'] when it is there"),
}


def package_modules(roots: dict) -> dict:
    """{dotted module name: (path, is a package)} for every .py file under each {package name: directory}."""
    modules = {}
    for package, root in roots.items():
        for path in sorted(Path(root).rglob("*.py")):
            parts = [*package.split("."), *path.relative_to(root).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imports(tree):
    """(import node, enclosing function name or None) for every import; `if TYPE_CHECKING:` blocks are skipped."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, function))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            visit(child, inner)

    visit(tree, None)
    return found


def _targets(module: str, is_package: bool, node) -> list[str]:
    """The dotted names an import statement may load (the module itself and, for `from X import y`, X.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
    else:
        base = []
    name = ".".join(base + ([node.module] if node.module else []))
    return [name] + [f"{name}.{alias.name}" for alias in node.names]


def import_graph(modules: dict) -> dict:
    """{module: {imported module: {enclosing function or None, ...}}} inside the package. Importing a.b.c runs
    the packages a and a.b first, so they are edges too; a module's own parent packages are already being
    imported when it runs, so they are not."""
    graph = {}
    for module, (path, is_package) in modules.items():
        edges = graph.setdefault(module, {})
        for node, function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(module, is_package, node):
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    name = ".".join(parts[:k])
                    if name in modules and name != module and not module.startswith(name + "."):
                        edges.setdefault(name, set()).add(function)
    return graph


def find_circle(graph: dict, skip=lambda importer, imported, functions: False):
    """One import circle [m0, m1, ..., m0] in ``graph`` (edges for which skip() is true left out), or None."""
    state, stack = {}, []

    def walk(module):
        state[module] = "open"
        stack.append(module)
        for imported, functions in sorted(graph.get(module, {}).items()):
            if skip(module, imported, functions):
                continue
            if state.get(imported) == "open":
                return stack[stack.index(imported):] + [imported]
            if imported not in state:
                circle = walk(imported)
                if circle:
                    return circle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            circle = walk(module)
            if circle:
                return circle
    return None


def at_import_time(graph: dict) -> dict:
    return {m: {t: {None} for t, fs in edges.items() if None in fs} for m, edges in graph.items()}


@pytest.fixture(scope="module")
def graph():
    roots = {"kobattr": Path(kobattr.__file__).parent, "kobattr.kernels": Path(kobattr.kernels.__file__).parent}
    return import_graph(package_modules(roots))


def test_no_circle_at_import_time(graph):
    assert "kobattr.result" in graph and "kobattr.views.html" in graph["kobattr.views"]  # the walk saw the package
    assert find_circle(at_import_time(graph)) is None


def test_no_circle_with_late_imports_beyond_the_listed_ones(graph):
    def listed(importer, imported, functions):
        allowed = LATE_UPWARD.get((importer, imported))
        return allowed is not None and functions <= allowed[0]

    assert find_circle(graph, skip=listed) is None
    for (importer, imported), (functions, _) in LATE_UPWARD.items():  # still needed, and never at import time
        assert graph[importer][imported] <= functions, graph[importer][imported]


def test_io_and_the_result_types_stay_below_what_uses_them(graph):
    assert not graph["kobattr.io"]  # everything may use kobattr.io: it uses no other kobattr module
    assert "kobattr.result" in graph["kobattr.views.data"] and "kobattr.result" in graph["kobattr.views.html"]
    assert "kobattr.result" not in graph["kobattr.alignment"]  # alignment works on tensors; results use it
    assert not {"kobattr.cli", "kobattr.api"} & set(graph["kobattr.result"])


def test_the_walk_finds_relative_absolute_and_late_circles(tmp_path):
    """The graph and circle finder themselves, on a package written here: they must see what the real test relies on."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("import os\nfrom .sub import b\n")
    (pkg / "sub" / "b.py").write_text("try:\n    from pkg.c import C\nexcept ImportError:\n    pass\nB = 1\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n"
                              "def late():\n    from . import a\nC = 1\n")
    graph = import_graph(package_modules({"pkg": pkg}))
    assert graph["pkg.a"] == {"pkg.sub": {None}, "pkg.sub.b": {None}}  # the package's __init__ runs first
    assert find_circle(at_import_time(graph)) is None  # the TYPE_CHECKING import never runs
    assert find_circle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.c", "pkg.a"]  # through late() in pkg.c
    (pkg / "c.py").write_text("from .a import x\n")
    assert find_circle(at_import_time(import_graph(package_modules({"pkg": pkg})))) is not None
