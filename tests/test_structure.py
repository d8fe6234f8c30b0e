"""The shape of the code: every module of the installed packages (crawler, assign, core) is at
most MAX_MODULE_LINES long unless a ``# size:`` comment in its first lines says why, every
function at most MAX_FUNCTION_LINES, and the import contracts (layers, no cycles) hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("crawler", "assign", "core")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
SIZE_NOTE = "# size:"  # in a module's first lines: why it is longer than MAX_MODULE_LINES

# Modules longer than MAX_MODULE_LINES without a ``# size:`` comment of their own, each with
# its reason.
LONG_MODULES: dict[str, str] = {}
# Functions longer than MAX_FUNCTION_LINES ("path:name"), each with its reason.
LONG_FUNCTIONS: dict[str, str] = {}


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def too_long(path: Path) -> bool:
    text = lines(path)
    noted = any(line.startswith(SIZE_NOTE) for line in text[:3])
    return len(text) > MAX_MODULE_LINES and not noted and name(path) not in LONG_MODULES


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            key = f"{name(path)}:{node.name}"
            if length > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                out.append(f"{key} ({length} lines)")
    return out


def test_every_module_is_short_or_says_why() -> None:
    long = [f"{name(p)} ({len(lines(p))} lines)" for p in modules() if too_long(p)]
    assert not long, f"over {MAX_MODULE_LINES} lines with no '{SIZE_NOTE}' comment: {long}"


def test_every_function_is_short() -> None:
    long = [f for p in modules() for f in long_functions(p)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_exceptions_are_still_needed() -> None:
    """An exception for a module or function that has come within the limit goes."""
    by_name = {name(p): p for p in modules()}
    stale = [
        m for m in LONG_MODULES if m not in by_name or len(lines(by_name[m])) <= MAX_MODULE_LINES
    ]
    assert not stale, f"within {MAX_MODULE_LINES} lines now: {stale}"
    assert not [f for f in LONG_FUNCTIONS if f.split(":")[0] not in by_name]


def test_a_module_past_the_limit_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "crawler").mkdir()
    grown = tmp_path / "crawler" / "grown.py"
    grown.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert too_long(grown)
    grown.write_text(f"{SIZE_NOTE} one table of settings\n" + "x = 1\n" * MAX_MODULE_LINES)
    assert not too_long(grown)
    body = "".join("    x = 1\n" for _ in range(MAX_FUNCTION_LINES))
    grown.write_text(f"def f():\n{body}")
    assert long_functions(grown) == [f"crawler/grown.py:f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_the_import_contracts_hold() -> None:
    """Layers crawler > assign > core, no import cycle among a package's modules (pyproject's
    [tool.importlinter])."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
