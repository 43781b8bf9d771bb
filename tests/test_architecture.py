"""The layout's rules (docs/architecture.md): imports flow one way, and the objective knows nothing of Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distillens"

LAYERS = [
    {
        "losses",
        "fused",
        "allocator",
        "structure",
        "hub",
        "checkpoints",
        "sampling",
        "optimization",
        "console",
        "evaluation",
        "measures",
        "intervals",
        "precision",
        "resume",
        "runs",
    },
    {"lens", "models", "data"},
    {"distributed", "export", "onpolicy"},
    {"diagnostics", "objective"},
    {"callbacks"},
    {"module"},
    {"commands"},
    {"lightning_cli"},
    {"cli", "__main__"},
]
"""Bottom to top: a module may import only from its own layer's other modules or from layers below."""


def imports_of(path: Path) -> set[str]:
    """The distillens modules (first component under the package) a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name.split(".")[1] for name in names if name.startswith("distillens.")}


def import_graph() -> dict[str, set[str]]:
    """Top-level module (a file, or the data package as one) -> the top-level modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        graph.setdefault(parts[0], set()).update(imports_of(path) - {parts[0]})
    return graph


def test_every_module_is_placed_in_a_layer():
    placed = set().union(*LAYERS)
    assert set(import_graph()) == placed


def test_imports_flow_from_the_top_down():
    layer_of = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    upward = [
        f"{module} -> {imported}"
        for module, imported_names in import_graph().items()
        for imported in imported_names
        if layer_of[imported] > layer_of[module]
    ]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph, done, active = import_graph(), set(), []

    def visit(name: str) -> None:
        assert name not in active, f"import cycle: {' -> '.join([*active, name])}"
        if name in done:
            return
        active.append(name)
        for imported in graph[name]:
            visit(imported)
        active.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_the_objective_losses_and_lens_import_no_lightning():
    for name in ("objective.py", "lens.py", "losses.py", "sampling.py", "structure.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        assert not [m for m in modules if m and m.split(".")[0] in ("lightning", "pytorch_lightning")], name
