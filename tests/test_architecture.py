"""The layout's rules as docs/architecture.md writes them: imports flow one way through its list of layers, and the
modules it names as Lightning-free load neither Lightning nor PEFT."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

PACKAGE = REPO / "distillens"
RULES = (REPO / "docs" / "architecture.md").read_text()


def written_layers() -> list[set[str]]:
    """The layers of the rule "Imports flow one way", bottom to top: the ```text block after it, written from the
    top down as ``label: module, module, ...``, an indented line going on with the layer above it."""
    rule = RULES[RULES.index("**Imports flow one way**") :]
    block = textwrap.dedent(re.search(r"```text\n(.*?)\n\s*```", rule, re.S).group(1))
    layers: list[str] = []
    for line in block.splitlines():
        if line[:1].isspace():
            layers[-1] += " " + line
        else:
            layers.append(line.split(":", 1)[1])
    return [{name.strip() for name in layer.split(",") if name.strip()} for layer in reversed(layers)]


def written_lightning_free() -> list[str]:
    """The modules the rule "No Lightning in the objective" names: every `name` in backquotes in that bullet."""
    rule = RULES[RULES.index("**No Lightning in the objective") :]
    return re.findall(r"`(\w+)`", rule[: rule.index("\n- **")])


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


def test_the_written_layers_name_each_module_once():
    layers = written_layers()
    assert len(layers) > 5 and sum(map(len, layers)) == len(set().union(*layers))


def test_every_module_is_placed_in_a_layer():
    assert set(import_graph()) == set().union(*written_layers())


def test_imports_flow_from_the_top_down():
    layer_of = {name: index for index, layer in enumerate(written_layers()) for name in layer}
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


@pytest.fixture(scope="module")
def frameworks_loaded() -> dict[str, list[str]]:
    """Each Lightning-free module imported alone in a fresh process (tests/import_probe.py): what of Lightning or
    PEFT it left in ``sys.modules``. An AST scan sees direct imports only; this sees what an import really loads."""
    probe = [sys.executable, str(REPO / "tests" / "import_probe.py"), *written_lightning_free()]
    done = subprocess.run(probe, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_rule_names_the_objective_and_generation():
    assert {"objective", "lens", "losses", "sampling", "onpolicy", "generation"} <= set(
        written_lightning_free()
    )


@pytest.mark.parametrize("name", written_lightning_free())
def test_lightning_free_modules_load_neither_lightning_nor_peft(frameworks_loaded, name):
    assert frameworks_loaded[name] == []
