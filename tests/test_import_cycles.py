"""No import cycles in the package.

Every module of ``mtlface_fast/`` and of ``kernels/`` (which imports as ``mtlface_fast.kernels``) is parsed,
and every import statement of a package module -- at module level, in class bodies and inside functions,
absolute and relative -- becomes an edge ``importer -> imported``. ``from X import name`` goes to the module
``X.name`` when that is a module, else to ``X``; importing a package goes to its ``__init__``. The one edge
that is not counted is a package's ``__init__`` importing one of its own submodules (``a`` -> ``a.b``, not
``a.b.c``): that is how a package exposes its parts. Any strongly connected component of more than one module is a cycle,
reported with the import statements (file:line) that close it.

A function-level import in a cycle still counts: it only hides the cycle until the function runs first.
"""
from __future__ import annotations

import ast
import os
from collections import deque
from typing import Dict, List, NamedTuple, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder (relative to the repository) -> the package it imports as
SOURCES = {"mtlface_fast": "mtlface_fast", "kernels": "mtlface_fast.kernels"}


class Edge(NamedTuple):
    source: str
    target: str
    where: str  # file:line of the import statement
    in_function: bool


class Step(NamedTuple):
    """One link of a cycle: every import statement of ``source`` that imports ``target``."""
    source: str
    target: str
    edges: Tuple[Edge, ...]


def discover(root: str, sources: Dict[str, str]) -> Dict[str, str]:
    """Module name -> file path of every ``.py`` under each source folder."""
    modules: Dict[str, str] = {}
    for folder, package in sources.items():
        base = os.path.join(root, folder)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"source folder {base} not found")
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(dirpath, base)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    stem = name[:-3]
                    modules[".".join(parts if stem == "__init__" else parts + [stem])] = os.path.join(dirpath, name)
    return modules


class _Imports(ast.NodeVisitor):
    """(imported module name, line, inside a function) of every import statement of one file."""

    def __init__(self, module: str, is_package: bool, modules: Dict[str, str], path: str):
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules, self.path = modules, path
        self.depth = 0
        self.found: List[Tuple[str, int, bool]] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            parts = self.package.split(".") if self.package else []
            if node.level - 1 >= len(parts):
                raise ValueError(f"{self.path}:{node.lineno}: relative import beyond the top-level package")
            base = ".".join(parts[:len(parts) - (node.level - 1)])
            if node.module:
                base = f"{base}.{node.module}"
        else:
            base = node.module
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self.found.append((sub if sub in self.modules else base, node.lineno, self.depth > 0))


def import_graph(root: str, sources: Dict[str, str]) -> Tuple[Dict[str, str], List[Edge]]:
    """(modules, edges) of the package's own imports, without a package ``__init__``'s edges to its own
    submodules and without a module importing itself."""
    modules = discover(root, sources)
    edges: List[Edge] = []
    for name, path in modules.items():
        is_package = os.path.basename(path) == "__init__.py"
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        visitor = _Imports(name, is_package, modules, path)
        visitor.visit(tree)
        for target, line, in_function in dict.fromkeys(visitor.found):  # once per statement and target
            if target not in modules or target == name:
                continue
            if is_package and target.rpartition(".")[0] == name:
                continue  # a package exposing its own submodule
            edges.append(Edge(name, target, f"{os.path.relpath(path, root)}:{line}", in_function))
    return modules, edges


def strongly_connected(nodes: List[str], succ: Dict[str, List[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in a stable order."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components: List[List[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ.get(child, ()))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def find_cycles(root: str, sources: Dict[str, str]) -> List[List[Step]]:
    """Every import cycle, as its links (each with its import statements). Each link inside a strongly
    connected component is reported in one cycle at least, closed by the shortest way back through that
    component; a cycle is reported once, whichever module it is entered from."""
    modules, edges = import_graph(root, sources)
    first: Dict[Tuple[str, str], List[Edge]] = {}
    for e in edges:
        first.setdefault((e.source, e.target), []).append(e)
    succ: Dict[str, List[str]] = {}
    for a, b in first:
        succ.setdefault(a, []).append(b)
    for targets in succ.values():
        targets.sort()
    cycles: List[List[Edge]] = []
    seen: Set[Tuple[str, ...]] = set()
    for component in strongly_connected(sorted(modules), succ):
        if len(component) < 2:
            continue
        members = set(component)
        for a, b in sorted(first):
            if a not in members or b not in members:
                continue
            # shortest path b -> a inside the component closes the cycle through this edge
            prev = {b: None}
            queue = deque([b])
            while queue and a not in prev:
                node = queue.popleft()
                for nxt in succ.get(node, ()):
                    if nxt in members and nxt not in prev:
                        prev[nxt] = node
                        queue.append(nxt)
            path = [a]
            while path[-1] != b:
                path.append(prev[path[-1]])
            nodes = [a] + path[::-1]  # a -> b -> ... -> a
            ring = nodes[:-1]
            turn = ring.index(min(ring))
            key = tuple(ring[turn:] + ring[:turn])
            if key in seen:
                continue
            seen.add(key)
            cycles.append([Step(x, y, tuple(first[(x, y)])) for x, y in zip(nodes, nodes[1:])])
    return cycles


def describe(cycle: List[Step]) -> str:
    """``a [a.py:3] -> b [b.py:7 in a function, b.py:9] -> a``: each module with the statements that import the
    next one."""
    def where(step: Step) -> str:
        return ", ".join(f"{e.where}{' in a function' if e.in_function else ''}" for e in step.edges)
    return " -> ".join(f"{s.source} [{where(s)}]" for s in cycle) + f" -> {cycle[0].source}"


def test_package_has_no_import_cycles():
    cycles = find_cycles(ROOT, SOURCES)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(describe(c) for c in cycles)


def test_the_graph_covers_the_package():
    modules, edges = import_graph(ROOT, SOURCES)
    for name in ("mtlface_fast", "mtlface_fast.cli", "mtlface_fast.layers.icm", "mtlface_fast.kernels",
                 "mtlface_fast.kernels.utils", "mtlface_fast.export.program"):
        assert name in modules, name
    kinds = {(e.source, e.target): e.in_function for e in edges}
    assert kinds[("mtlface_fast.kernels.afd", "mtlface_fast.kernels.utils")] is False  # inside the mapped folder
    assert kinds[("mtlface_fast.cli", "mtlface_fast.errors")] is False  # relative, module level
    assert kinds[("mtlface_fast.cli", "mtlface_fast.demo")] is True  # relative, in a function
    assert ("mtlface_fast", "mtlface_fast.preprocess") not in kinds  # a package exposing its own submodule


# -- the cycle finder on small packages ---------------------------------------------------------------------------
def _write(root, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


CLEAN = {
    "pkg/__init__.py": "from .a import A\nfrom . import sub\n",  # a package exposing its own submodules
    "pkg/a.py": "import os\nfrom .b import B\nfrom .sub import c\n\nA = B\n",
    "pkg/b.py": "from pkg.sub.c import C\n\nB = C\n\n\ndef helper():\n    import pkg.sub.c\n    return pkg\n",
    "pkg/sub/__init__.py": "from .c import C\n",
    "pkg/sub/c.py": "from .. import util\nfrom ..util import tool\nC = 1\n",
    "pkg/util.py": "def tool():\n    return 1\n",
    "pkg/child.py": "from . import A\n",  # a child importing its parent's __init__, which does not import it
    "ext/__init__.py": "",
    "ext/m.py": "from pkg.util import tool\n",  # the mapped folder imports the package
}
SOURCES_SYNTH = {"pkg": "pkg", "ext": "pkg.ext"}


def test_cycle_finder_on_a_package_without_cycles(tmp_path):
    _write(tmp_path, CLEAN)
    modules, edges = import_graph(str(tmp_path), SOURCES_SYNTH)
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.util", "pkg.child", "pkg.ext",
                            "pkg.ext.m"}
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {("pkg.a", "pkg.b"), ("pkg.a", "pkg.sub.c"), ("pkg.b", "pkg.sub.c"), ("pkg.sub.c", "pkg.util"),
                     ("pkg.child", "pkg"), ("pkg.ext.m", "pkg.util")}, pairs
    assert [e.in_function for e in edges if e.source == "pkg.b"] == [False, True]
    assert find_cycles(str(tmp_path), SOURCES_SYNTH) == []


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    files = dict(CLEAN)
    files["pkg/util.py"] = "def tool():\n    from .a import A\n    return A\n"  # a -> sub.c -> util -> a
    _write(tmp_path, files)
    cycles = find_cycles(str(tmp_path), SOURCES_SYNTH)
    rings = [[e.source for e in c] for c in cycles]
    assert ["pkg.a", "pkg.sub.c", "pkg.util"] in rings, rings
    # a -> b -> sub.c -> util -> a uses the other edge out of a
    assert ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.util"] in rings, rings
    assert len(cycles) == 2, rings
    text = describe(next(c for c in cycles if len(c) == 3))
    assert text == ("pkg.a [pkg/a.py:3] -> pkg.sub.c [pkg/sub/c.py:1, pkg/sub/c.py:2] -> pkg.util [pkg/util.py:2 "
                    "in a function] -> pkg.a"), text


def test_cycle_finder_follows_the_mapped_folder_and_package_inits(tmp_path):
    files = dict(CLEAN)
    files["pkg/util.py"] = "from .ext import m\n"  # util -> ext.m -> util, across the mapped folder
    files["pkg/sub/__init__.py"] = "from .c import C\nfrom ..child import x\n"  # sub -> child -> pkg: no way back
    _write(tmp_path, files)
    rings = [[e.source for e in c] for c in find_cycles(str(tmp_path), SOURCES_SYNTH)]
    assert rings == [["pkg.ext.m", "pkg.util"]], rings
    # a child that imports its parent package, whose __init__ imports (through a grandchild, which counts) the
    # child back
    files["pkg/__init__.py"] = "from .a import A\nfrom .ext import m\n"
    files["pkg/util.py"] = "def tool():\n    return 1\n"
    files["ext/m.py"] = "from pkg.child import x\n"
    _write(tmp_path, files)
    rings = [[e.source for e in c] for c in find_cycles(str(tmp_path), SOURCES_SYNTH)]
    assert rings == [["pkg", "pkg.ext.m", "pkg.child"]], rings


def test_relative_import_beyond_the_package_is_an_error(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from ... import x\n"})
    with pytest.raises(ValueError, match="beyond the top-level package"):
        import_graph(str(tmp_path), {"pkg": "pkg"})
