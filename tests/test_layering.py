"""The import graph of mlxserve/: no cycles, MLX only in engine/, http/ never imports engine/.

Read with the stdlib ``ast`` (nothing is imported), so a violation fails here before it fails at
run time. Imports inside functions count too: a lazy import is still a dependency. Imports under
``if TYPE_CHECKING:`` never run, so they make no cycle, but they still may not point the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mlxserve"

# Known exceptions that other helpers are still fixing; each entry must still be needed (a
# stale entry fails too), so the list only shrinks.
MLX_OUTSIDE_ENGINE: set[str] = set()
HTTP_TO_ENGINE: set[tuple[str, str]] = set()
STORE_TO_ENGINE: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imports(path: Path, modules: set[str], *, typing: bool = True) -> set[str]:
    """Absolute names of what ``path`` imports (mlxserve modules resolved to the module);
    ``typing`` false leaves out the imports that only type checkers run."""
    name = _module_name(path)
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if typing else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from . import x` imports the submodule x when there is one
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in modules else mod)
    return found


def _graph(*, typing: bool = True) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for imp in _imports(path, modules, typing=typing):
            # `import a.b.c` depends on the deepest mlxserve module it names
            while imp and imp not in modules and imp.startswith("mlxserve"):
                imp = imp.rpartition(".")[0]
            deps.add(imp)
        graph[name] = deps
    return graph


def _external(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {d for d in deps if not d.startswith("mlxserve")} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), inside mlxserve.
    A package's ``__init__`` importing its own submodules is not counted as a cycle edge back."""
    inner = {m: {d for d in deps if d in graph and not m.startswith(d + ".")} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(inner[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(inner):
        if v not in index:
            visit(v)
    return out


GRAPH = _graph()
RUNTIME_GRAPH = _graph(typing=False)


def test_graph_sees_the_package():
    assert "mlxserve.actors.scheduler" in GRAPH
    assert "mlxserve.errors" in GRAPH["mlxserve.actors.scheduler"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "p": {"p.x"}, "p.x": {"p"}}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]  # a package importing its own module is none


def test_no_import_cycles():
    cycles = _cycles(RUNTIME_GRAPH)
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_mlx_only_in_engine():
    ext = _external(GRAPH)
    offenders = {
        m
        for m, deps in ext.items()
        if not m.startswith("mlxserve.engine")
        and any(d == "mlx" or d.startswith(("mlx.", "mlx_lm", "mlx_vlm")) for d in deps)
    }
    assert offenders - MLX_OUTSIDE_ENGINE == set(), f"MLX imported outside engine/: {sorted(offenders)}"
    assert MLX_OUTSIDE_ENGINE - offenders == set(), (
        f"allowlisted modules that no longer import MLX (remove them): {MLX_OUTSIDE_ENGINE - offenders}"
    )


@pytest.mark.parametrize("layer,allowed", [("mlxserve.http", HTTP_TO_ENGINE), ("mlxserve.store", STORE_TO_ENGINE)])
def test_does_not_import_engine(layer, allowed):
    """HTTP reaches the engine only through the actors; the store gets conversion injected."""
    edges = {
        (m, d) for m, deps in GRAPH.items() if m.startswith(layer) for d in deps if d.startswith("mlxserve.engine")
    }
    assert edges - allowed == set(), f"{layer} imports engine/: {sorted(edges - allowed)}"
    assert allowed - edges == set(), f"stale allowlist entries (remove them): {allowed - edges}"


@pytest.mark.parametrize(
    "layer,forbidden",
    [
        ("mlxserve.engine", ("mlxserve.actors", "mlxserve.http", "mlxserve.cli")),
        ("mlxserve.store", ("mlxserve.actors", "mlxserve.http", "mlxserve.cli")),
        ("mlxserve.specs", ("mlxserve.actors", "mlxserve.http", "mlxserve.cli")),
        ("mlxserve.actors", ("mlxserve.http", "mlxserve.cli")),
        ("mlxserve.http", ("mlxserve.cli",)),
    ],
)
def test_imports_point_one_way(layer, forbidden):
    edges = sorted((m, d) for m, deps in GRAPH.items() if m.startswith(layer) for d in deps if d.startswith(forbidden))
    assert edges == [], f"{layer} imports upward: {edges}"


# Modules that may name MLXSERVE_* variables besides config.py (which reads them into Settings).
SETTING_NAMES_ALLOWED = {
    "mlxserve.chaos": "the harness sets them for the daemons it starts (the whole package)",
    "mlxserve.cli.main": "serve --host sets MLXSERVE_HOST for the daemon",
    "mlxserve.actors.faults": "the control file's variable name, for the harness to set",
}


def test_settings_are_read_in_config():
    """Every MLXSERVE_* variable is read by config.Settings, so one table lists them all."""
    import re

    named = set()
    for path in ROOT.rglob("*.py"):
        mod = _module_name(path)
        if mod == "mlxserve.config":
            continue
        tree = ast.parse(path.read_text(), str(path))
        # Keys of the app's config (app.config["MLXSERVE_RUNTIME"]) are not variables.
        keys = {
            id(n.slice)
            for n in ast.walk(tree)
            if isinstance(n, ast.Subscript) and ast.unparse(n.value).endswith("config")
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in keys
                and re.fullmatch(r"MLXSERVE_[A-Z0-9_]+", node.value)
            ):
                named.add(mod)
    allowed = tuple(SETTING_NAMES_ALLOWED)
    outside = sorted(m for m in named if not m.startswith(allowed))
    assert outside == [], f"MLXSERVE_* read outside config.py: {outside}"
    stale = sorted(a for a in allowed if not any(m.startswith(a) for m in named))
    assert stale == [], f"allowlisted modules that name no MLXSERVE_* variable (remove them): {stale}"
