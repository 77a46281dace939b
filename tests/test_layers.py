"""The package's layers: no module imports from a layer above its own, no import cycles, no private names
imported across modules. Read from the source with ``ast`` (imports under ``if TYPE_CHECKING:`` are
annotations, not run, and are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pathomics"

# bottom to top; a module may import its own layer and the ones below
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pathomics", "errors", "layout", "io"),
    ("slide", "store", "shards", "batch", "locks", "folds", "losses", "device", "manifest"),
    ("tissue", "qc", "tiling", "encoders", "embed"),
    ("mil", "survival"),
    ("runner",),
    ("report", "viewer", "export", "synthetic"),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run, wherever they are (module level or inside functions)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The pathomics modules ``name`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    targets: set[str] = set()
    for node in runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.split(".")[0] == "pathomics")
            continue
        if node.level:
            base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "pathomics":
            continue
        for alias in node.names:
            targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) - {name} for name, path in found.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1] if len(parts) > 1 else "pathomics"]


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({m.split(".")[1] for m in modules() if "." in m and m.split(".")[1] not in RANK})
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_no_import_goes_up_a_layer() -> None:
    upward = sorted(f"{src} -> {dst}" for src, targets in graph().items() for dst in targets
                    if layer_of(dst) > layer_of(src))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 finished

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_modules() -> None:
    crossing = sorted(
        f"{module_name(path)} imports {node.module}.{alias.name}"
        for path in PACKAGE.rglob("*.py")
        for node in runtime_imports(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pathomics")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    )
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("source, target, upward", [("pathomics.qc", "pathomics.runner.pipeline", True),
                                                    ("pathomics.cli.run", "pathomics.tiling", False)])
def test_layer_order_reads_as_documented(source: str, target: str, upward: bool) -> None:
    assert (layer_of(target) > layer_of(source)) is upward
