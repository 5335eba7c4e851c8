"""The shape of the code: no import cycles among accord's modules, and nats-py only behind the
engine seam. Built from the AST of every module (imports under `if TYPE_CHECKING:` count too:
a type that names an upper layer's class is a dependency on it); package `__init__` faces, which
only re-export, are left out of the graph."""

from __future__ import annotations

import ast
from pathlib import Path

import accord

ROOT = Path(accord.__file__).parent
#: Packages allowed to import nats-py: the engine seam, and test support probing its servers.
NATS_ALLOWED = ("accord.engine", "accord.testing")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out[".".join(rel.parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(accord modules imported, external top-level packages imported) by one module."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    local: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t in known:
                local.add(t)
            elif not t.startswith("accord"):
                external.add(t.split(".")[0])
    return local, external


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = _modules()
    known = set(mods)
    faces = {m for m, p in mods.items() if p.name == "__init__.py"}
    edges: dict[str, set[str]] = {}
    externals: dict[str, set[str]] = {}
    for name, path in mods.items():
        local, external = _imports(name.removesuffix(".__init__"), path, known)
        key = name.removesuffix(".__init__")
        edges[key] = {m.removesuffix(".__init__") for m in local if m not in faces} - {key}
        externals[key] = external
    return edges, externals


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nats_py_is_imported_only_behind_the_engine_seam() -> None:
    _, externals = _graph()
    offenders = sorted(
        m for m, ext in externals.items() if "nats" in ext and not m.startswith(NATS_ALLOWED)
    )
    assert offenders == []


def test_redis_py_is_imported_only_by_the_redis_backend() -> None:
    _, externals = _graph()
    offenders = sorted(m for m, ext in externals.items() if "redis" in ext and "redis" not in m)
    assert offenders == []


def test_no_module_over_600_lines_and_no_class_over_400() -> None:
    big_modules, big_classes = [], []
    for name, path in _modules().items():
        src = path.read_text()
        if src.count("\n") > 600:
            big_modules.append(name)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > 400:
                    big_classes.append(f"{name}.{node.name} ({size})")
    assert big_modules == [] and big_classes == []
