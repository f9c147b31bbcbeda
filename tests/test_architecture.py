"""The package layout keeps its promises (see docs/architecture.md).

Every import points down the flow inputs → core → mail → delivery → service
→ cli; no module imports another module's private names; modules and
functions stay small enough to read in one sitting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "invite_mailer"

#: The packages in the order data flows; errors and logs serve everyone.
LAYERS = {"errors": 0, "logs": 0, "inputs": 1, "core": 2, "mail": 3, "delivery": 4}
LAYERS |= {"service": 5, "cli": 6}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

MODULES = sorted(SRC.rglob("*.py"))


def layer_of(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def imports_of(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every ``invite_mailer`` import."""
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative>", []))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [alias.name for alias in node.names]
            if node.module == "invite_mailer":
                found += [(node.lineno, f"invite_mailer.{name}", []) for name in names]
            elif node.module.startswith("invite_mailer."):
                found.append((node.lineno, node.module, names))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("invite_")]
    return found


def test_the_layout_is_the_flow() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == {"inputs", "core", "mail", "delivery", "service", "cli"}
    top = {p.stem for p in SRC.glob("*.py")}
    assert top == {"__init__", "__main__", "errors", "logs"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_the_flow(path: Path) -> None:
    me = layer_of(path)
    if me not in LAYERS:
        return  # __init__ and __main__ of the package sit on top of everything
    wrong = []
    for line, module, names in imports_of(ast.parse(path.read_text(encoding="utf-8"))):
        if module == "<relative>":
            wrong.append(f"line {line}: a relative import (use invite_mailer.<package>...)")
            continue
        target = module.split(".")[1]
        if target in LAYERS and LAYERS[target] > LAYERS[me]:
            wrong.append(f"line {line}: {me} imports {module}, which comes later in the flow")
        wrong += [
            f"line {line}: imports the private name {name} of {module}"
            for name in names
            if name.startswith("_")
        ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_and_functions_are_small(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{lines} lines; split the module by concern"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_no_private_api_of_the_standard_email_package() -> None:
    used = [p.name for p in MODULES if "_encoded_words" in p.read_text(encoding="utf-8")]
    assert not used
