"""One entry point, `finetune.commands:main`, and no import cycle through it: the commands that
need no Trainer run without Lightning, and each module of the command line imports alone."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "finetune"
COMMAND_LINE = ["finetune.commands", "finetune.cli", "finetune.check_data", "finetune.__main__", "finetune.errors"]


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The finetune modules `path` imports, at the top or inside a function (a cycle is a cycle
    even when one side imports late)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("finetune"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        name = todo.pop()
        if name == goal:
            return True
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return False


@pytest.mark.parametrize("module", COMMAND_LINE)
def test_no_import_cycle_through_the_command_line(module):
    graph = import_graph()
    back = sorted(m for m in graph[module] if reaches(graph, m, module))
    assert not back, f"{module} imports {back}, which import {module} back"


def test_nothing_imports_the_entry_point():
    graph = import_graph()
    assert [name for name, imported in graph.items() if "finetune.commands" in imported] == ["finetune.__main__"]


def test_console_script_and_python_m_are_the_same_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"finetune": "finetune.commands:main"}
    assert imports_of(PACKAGE / "__main__.py") == {"finetune.commands", "finetune.commands.main"}
    assert not hasattr(__import__("finetune.cli", fromlist=["main"]), "main")  # no second way in


def test_each_module_imports_alone_and_light_commands_never_import_lightning(tmp_path):
    """A fresh interpreter (an import cycle only shows there); Lightning made unimportable for
    the commands that must not need it."""
    script = f"""
import importlib, subprocess, sys
for module in {COMMAND_LINE[:3]!r}:
    subprocess.run([sys.executable, "-c", f"import {{module}}"], check=True)
sys.modules["lightning"] = None  # `import lightning` now raises ImportError
from finetune.commands import main
for argv in (["search", "--help"], ["export", "--help"], ["predict", "--exported", "model.onnx", "--help"]):
    sys.argv = ["finetune", *argv]
    try:
        main()
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
assert not any(m.split(".")[0] == "lightning" for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
