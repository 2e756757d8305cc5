"""Imports run one way: models/, kernels/ and passes/ never import the engine or the server.

A static check of every import statement in those trees, function-local imports included (an
import inside a function is still a dependency, only a later one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOTTOM_LAYERS = ("models", "kernels", "passes")
ABOVE = ("compiled_serve.engine", "compiled_serve.server", "compiled_serve.cli", "compiled_serve.llm")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every `import x` and `from x import y` anywhere in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from compiled_serve import engine` names the package through its attribute.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def upward_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each import statement that reaches above the bottom layers, once a line."""
    found: dict[int, str] = {}
    for line, name in imported_modules(ast.parse(source)):
        if any(name == up or name.startswith(up + ".") for up in ABOVE):
            found.setdefault(line, name)
    return sorted(found.items())


@pytest.mark.parametrize("layer", BOTTOM_LAYERS)
def test_bottom_layers_do_not_import_the_engine_or_server(layer: str) -> None:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no python files under {layer}/"
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in files for line, name in upward_imports(path.read_text())]  # fmt: skip
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_every_spelling() -> None:
    source = (
        "import compiled_serve.engine.llm_engine\n"
        "from compiled_serve.server import app\n"
        "from compiled_serve import engine\n"
        "def f():\n"
        "    from compiled_serve.engine.forward_context import forward_context\n"
        "import compiled_serve.kernels.paged_attention\n"
        "from compiled_serve.engineering import x\n"
    )
    assert [line for line, _ in upward_imports(source)] == [1, 2, 3, 5]
