"""No import circles inside fastsemdiff: a module never imports, directly or through others, a module that
imports it back. A circle works only while every module in it happens to be imported in the right order and
uses the others' names late; one new module-level name breaks it with a partially-initialised-module error.

The graph, read from source with ``ast`` (nothing of the package is executed beyond what ``find_spec`` imports
to locate subpackages):

* Nodes: every module of the installed package under test (the checkout, or ``.venv-gpu-image``'s
  site-packages copy), found from ``fastsemdiff`` through each package's folders and through every import
  (so ``fastsemdiff.kernels``, mapped from ``kernels/`` by the editable install, is found too). Compiled
  extensions (``fastsemdiff._C``) are nodes without edges.
* Edges: every ``import`` and ``from ... import`` of a fastsemdiff module anywhere in the file: at module level,
  inside functions and classes, under ``if``/``try``. Relative imports are resolved against the module's
  package. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
* A package is the module of its ``__init__.py``: ``from fastsemdiff.data import X`` (X not a submodule) is an
  edge to ``fastsemdiff.data``, and the package's own imports (its re-exports) are its edges. The parent
  packages Python runs on the way to a submodule (``fastsemdiff`` and ``fastsemdiff.data`` before
  ``fastsemdiff.data.loader``) are *not* edges: Python always finishes a parent's ``__init__`` first, and with
  them every package that re-exports its submodules would be a circle.

A circle is a strongly connected component of more than one module.
"""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

PACKAGE = "fastsemdiff"


# ------------------------------------------------------------------------------------------- reading imports
def imported_modules(source: str, module: str, is_package: bool, is_module: Callable[[str], bool],
                     root: str = PACKAGE) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import of a ``root`` module in ``source``, the code of ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            targets = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == root or target.startswith(root + "."):
                yield target, node.lineno


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent that is a module, not a package, or no such parent
        return None


def package_graph(root: str = PACKAGE) -> tuple[dict[str, Optional[Path]], dict[str, dict[str, int]]]:
    """(module -> its file, or None for a compiled extension; module -> {imported module: first line})."""
    files: dict[str, Optional[Path]] = {}
    packages: set[str] = set()

    def is_module(name: str) -> bool:
        return name in files or add(name)

    def add(name: str) -> bool:
        """Add ``name`` (and, for a package, every module in its folders) if it is a module; whether it is."""
        if name in files:
            return True
        spec = _find_spec(name)
        if spec is None or spec.origin is None:
            return False
        path = Path(spec.origin)
        files[name] = path if path.suffix == ".py" else None
        if spec.submodule_search_locations is not None:
            packages.add(name)
            for info in pkgutil.iter_modules(list(spec.submodule_search_locations)):
                add(f"{name}.{info.name}")
        return True

    if not add(root):
        pytest.fail(f"{root} is not importable")
    edges: dict[str, dict[str, int]] = {}
    done: set[str] = set()
    while len(done) < len(files):  # imports can reveal modules the folders did not hold
        for name in sorted(set(files) - done):
            done.add(name)
            edges[name] = {}
            if files[name] is None:
                continue
            for target, line in imported_modules(files[name].read_text(), name, name in packages, is_module, root):
                if target != name:
                    edges[name].setdefault(target, line)
    return files, edges


# ------------------------------------------------------------------------------------------------- circles
def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def describe(component: list[str], edges: dict[str, dict[str, int]], files: dict[str, Optional[Path]]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for module in component:
        for target, line in sorted(edges[module].items()):
            if target in members:
                where = files[module].name if files[module] else module
                lines.append(f"    {module} imports {target} ({where}:{line})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def graph():
    return package_graph()


def test_no_module_of_the_package_imports_a_module_that_imports_it_back(graph):
    files, edges = graph
    found = circles(edges)
    assert not found, "import circles in fastsemdiff (each a strongly connected component):\n" + "\n".join(
        describe(c, edges, files) for c in found)


def test_the_graph_holds_the_whole_package(graph):
    """The walk reaches every subpackage (the kernels too, which the editable install maps from kernels/) and
    sees imports at module level, in functions, and relative ones."""
    files, edges = graph
    for package in ("fastsemdiff.nn", "fastsemdiff.ops", "fastsemdiff.models", "fastsemdiff.diffusion",
                    "fastsemdiff.data", "fastsemdiff.kernels"):
        assert package in files, f"{package} not found"
    assert "fastsemdiff.kernels.modulated_layer_norm" in files
    assert "fastsemdiff.data.latent_data" in edges["fastsemdiff.data.loader"]  # relative, module level
    assert "fastsemdiff.export" in edges["fastsemdiff"]  # relative, inside load()
    assert "fastsemdiff.config" in edges["fastsemdiff.data.loader"]  # `from ..config import`, inside a function
    assert len(files) > 40


def _resolve(source: str, module: str, is_package: bool = False, modules=()) -> set[str]:
    return {t for t, _ in imported_modules(source, module, is_package, lambda n: n in modules)}


def test_imports_are_resolved_as_python_resolves_them():
    mods = {"fastsemdiff.data.loader", "fastsemdiff.data.splits", "fastsemdiff.config", "fastsemdiff.data"}
    # relative imports, from a module and from a package's __init__
    assert _resolve("from .splits import load_split", "fastsemdiff.data.loader", modules=mods) == \
        {"fastsemdiff.data.splits"}
    assert _resolve("from .splits import load_split", "fastsemdiff.data", True, mods) == {"fastsemdiff.data.splits"}
    assert _resolve("from ..config import Config", "fastsemdiff.data.loader", modules=mods) == {"fastsemdiff.config"}
    # `from pkg import name`: the submodule when there is one, else the package (its __init__)
    assert _resolve("from . import splits", "fastsemdiff.data.loader", modules=mods) == {"fastsemdiff.data.splits"}
    assert _resolve("from fastsemdiff.data import mix_seed", "fastsemdiff.train", modules=mods) == \
        {"fastsemdiff.data"}
    # `import a.b.c` names a.b.c only; imports inside functions count; other packages do not
    source = "import os\nimport torch.nn\ndef f():\n    import fastsemdiff.data.loader as loader\n"
    assert _resolve(source, "fastsemdiff.train", modules=mods) == {"fastsemdiff.data.loader"}
    with pytest.raises(ValueError, match="beyond the top-level"):
        _resolve("from ... import x", "fastsemdiff.train", modules=mods)


def test_circles_finds_each_strongly_connected_component():
    edges = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {"e": 1}, "e": {"d": 1}, "f": {"a": 1},
             "g": {"g": 1}}
    assert circles(edges) == [["a", "b", "c"], ["d", "e"]]
    assert circles({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) == []
