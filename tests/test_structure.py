"""The shape of the ldm package: no import circle between its modules (module-level or inside
functions), the CPU/OS tricks only under ldm/ops, no file over 450 lines."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO

LDM = REPO / "ldm"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ldm/."""
    out = {}
    for path in sorted(LDM.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict) -> str | None:
    """The ldm module that importing ``name`` names: itself, else its longest module prefix."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the ldm modules it imports anywhere in its file (top level or in a function).
    ``from package import name`` counts as an import of ``package.name`` when that is a module."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                target = _target(name, modules)
                if target is not None and target != mod:
                    edges.add(target)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_circle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "ldm.checkpoint" in graph["ldm.models.diffusion.ddpm"]  # init_from_ckpt's import inside a method
    assert "ldm.ops" in graph["ldm.modules.attention"]
    assert "ldm.ops.capability" in graph["ldm.ops.conv"]  # from ldm.ops import capability: the module


def test_no_import_cycle_in_ldm():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import circles in ldm/ (module-level or function-level imports): " + "; ".join(
        " <-> ".join(c) for c in cycles)
    assert not any(m.startswith("ldm.models") for m in graph["ldm.checkpoint"])  # the loader knows no model class


def test_os_and_onednn_tricks_only_in_ldm_ops():
    word = re.compile(r"madvise|pagemap|mkldnn", re.IGNORECASE)
    outside = sorted(str(p.relative_to(REPO)) for p in LDM.rglob("*.py")
                     if (LDM / "ops") not in p.parents and word.search(p.read_text()))
    assert not outside, f"madvise/pagemap/mkldnn outside ldm/ops/: {outside}"


def test_model_files_import_only_public_ops_names():
    public = set(__import__("ldm.ops", fromlist=["__all__"]).__all__)
    offenders = []
    for path in LDM.rglob("*.py"):
        if (LDM / "ops") in path.parents or path.parent == LDM / "ops":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm.ops"):
                if node.module != "ldm.ops" or any(a.name not in public for a in node.names):
                    offenders.append(f"{path.relative_to(REPO)}: from {node.module} import "
                                     f"{', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("ldm.ops.") for a in node.names):
                offenders.append(f"{path.relative_to(REPO)}: import of an ldm.ops submodule")
    assert not offenders, "only ldm.ops's public names may be imported outside it: " + "; ".join(offenders)


def test_no_file_in_ldm_over_450_lines():
    """Reports every file over the limit in one message."""
    long = {str(p.relative_to(REPO)): n for p in sorted(LDM.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files in ldm/ over {MAX_LINES} lines (split them): " + ", ".join(
        f"{name} ({n})" for name, n in long.items())
