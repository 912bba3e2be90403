"""The shape of the code, checked: short functions, and engine names branched on only in backends/.

(The layer rules — which package may import which — are import-linter contracts in pyproject.toml,
run by `make lint`.)"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "personactl"
MAX_FUNCTION_LINES = 80
ENGINE_NAMES = {"hf", "vllm", "mlx"}


def modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these by meaning:\n" + "\n".join(long)


def test_only_backends_branch_on_the_engine_name():
    """Callers ask an engine's capabilities (`position_modes`, `reads_activations`, ...); comparing
    the backend setting with an engine's name happens in backends/ alone."""
    branches = []
    for path, tree in modules():
        if path.relative_to(PACKAGE).parts[0] == "backends":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                literals = {o.value for o in operands if isinstance(o, ast.Constant)}
                if literals & ENGINE_NAMES:
                    branches.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not branches, "engine-name branches outside backends/:\n" + "\n".join(branches)
