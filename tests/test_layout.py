"""The package's shape: few top-level modules, no import cycles, and imports only go down the layers.

Imports are read from the source (module level and inside functions alike), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import pathlib

import mosaic_lightning

PACKAGE_DIR = pathlib.Path(mosaic_lightning.__file__).parent
# Bottom to top; a module may import its own layer and the layers below it. Same rank: independent of each other.
LAYERS = {
    "core": 0,
    "calibration": 1,
    "recovery": 1,
    "evaluation": 2,
    "methods": 3,
    "allocation": 4,
    "pruning": 5,
    "export": 6,
    "streaming": 7,
    "trainer_access": 8,
    "shipped": 8,  # the packaged recipes and configs, by name
    "console": 8,  # what the command prints: summary table, quiet dependencies, one-line errors
    "lit": 9,
    "schedules": 10,
    "callbacks": 11,
    "cli": 12,
    "": 13,  # the package's own __init__: the public names
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports, resolved to modules (``from .x import y`` names ``x.y`` where
    ``y`` is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").split(".")[0] == "mosaic_lightning":
                target = node.module.removeprefix("mosaic_lightning").lstrip(".")
            else:
                continue
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mosaic_lightning":
                    found.add(alias.name.removeprefix("mosaic_lightning").lstrip("."))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_at_most_twelve_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(top) <= 12, top


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in _modules() if m.split(".")[0] not in LAYERS)
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_imports_only_go_down_the_layers():
    upward = [(m, t) for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
