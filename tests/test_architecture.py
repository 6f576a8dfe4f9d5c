"""The import rule of docs/architecture.md, checked on the source: layers import downwards only, the three
pipeline stages never import each other, and no two project files import each other (directly or in a ring).

Every `import` statement counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = {  # package -> layer; a file may import its own layer's package and the layers below
    "edgelearn": 0,  # ground floor: protocol, bundle, signing, MQTT, atomic files, program runners
    "models": 1,  # networks and their data
    "export": 2,
    "edge_runtime": 2,
    "coordinator": 2,
    "devices": 3,  # profiles, flashing, the fleet simulator: builds on the three stages
    "cli": 4,  # the `edgelearn` command and the demo
}
STAGES = {"export", "edge_runtime", "coordinator"}  # independent: none imports another


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYER for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports (a `from pkg import name` of a submodule counts as that submodule)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_files()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def test_layers_import_downwards_only():
    bad = []
    for mod, deps in graph().items():
        top = mod.split(".")[0]
        for d in deps:
            dtop = d.split(".")[0]
            if LAYER[dtop] > LAYER[top] or (top in STAGES and dtop in STAGES and dtop != top):
                bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_no_file_cycles():
    g = graph()
    for package_init in [m for m in g if "." not in m]:  # `import pkg.sub` runs pkg/__init__: not a cycle
        for deps in g.values():
            deps.discard(package_init)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for d in sorted(g[node]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d, [*stack, d])
        state[node] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
