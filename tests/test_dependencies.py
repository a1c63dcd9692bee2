"""Every package mlxserve/ imports is a declared dependency (pyproject.toml), pinned."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_levels() -> set[str]:
    names = set()
    for path in (ROOT / "mlxserve").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "mlxserve"}


def _declared() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for spec in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)", spec)
        assert m, spec
        out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return out


def test_every_import_is_a_pinned_dependency():
    declared = _declared()
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for name in sorted(_imported_top_levels()):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(name, [name])}
        if not dists & declared.keys():
            missing.append(f"{name} (from {sorted(dists)})")
    assert missing == [], f"imported but not declared in pyproject.toml: {missing}"
    unpinned = [name for name, rest in declared.items() if "==" not in rest]
    assert unpinned == [], f"dependencies without an exact pin: {unpinned}"
