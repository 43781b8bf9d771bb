"""Tests that start `distillens` or Python in a subprocess run the tree they belong to (helpers.subprocess_env).

The interpreter's editable install points at whichever checkout installed it; without the tree on PYTHONPATH, a
second checkout sharing the virtual environment would test the first checkout's code in every subprocess.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import REPO, TESTS, subprocess_env

STARTERS = {"run", "Popen", "call", "check_call", "check_output"}


def test_a_subprocess_imports_this_tree_before_any_other(tmp_path, monkeypatch):
    """A distillens on the inherited PYTHONPATH stands for another checkout's editable install; the probes of
    tests/ are found too."""
    other = tmp_path / "other-checkout"
    (other / "distillens").mkdir(parents=True)
    (other / "distillens" / "__init__.py").write_text("")
    probe = "import importlib.util, distillens; print(distillens.__file__, importlib.util.find_spec('probes').origin)"
    for inherited in (str(other), None):
        if inherited is None:
            monkeypatch.delenv("PYTHONPATH", raising=False)
        else:
            monkeypatch.setenv("PYTHONPATH", inherited)
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True,
            cwd=tmp_path, env=subprocess_env(),  # not the repository: the working directory gives nothing away
        )  # fmt: skip
        assert done.stdout.split() == [str(REPO / "distillens" / "__init__.py"), str(TESTS / "probes.py")]


def test_every_python_subprocess_of_the_tests_gets_this_trees_environment():
    """Each subprocess call in tests/ passes an ``env`` (helpers.subprocess_env); only npm (no Python) needs none."""
    missing = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            starter = isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
            if not starter or node.func.attr not in STARTERS:
                continue
            command = ast.unparse(node.args[0]) if node.args else ""
            if command.startswith("['npm'"):
                continue
            if not any(keyword.arg == "env" for keyword in node.keywords):
                missing.append(f"{path.name}:{node.lineno}: {command}")
    assert not missing, missing
