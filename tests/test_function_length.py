"""No Python function is over ~100 lines unless its reason is written down here (issue 27).

A function's length runs from its ``def`` to its last line, signature, docstring and comments
included: what a reader has to hold at once. Decorators are left out: a click command declares
its options as decorators (``leanclip index`` has eleven), a table to look up, not steps to follow.
Every function and method counts, nested ones too, in the package, training, the benchmarks and
the tests. A function that must stay
longer is listed in ``LONG`` with why; an entry whose function got shorter (or went away) fails
too, so the list says only what is true.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Tuple

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("python", "training", "benchmarks", "tests")
LIMIT = 100

# "path/to/file.py::Qualified.name": why it stays over LIMIT lines.
LONG: Dict[str, str] = {}


def _lengths(tree: ast.AST, prefix: str = "") -> Iterator[Tuple[str, int]]:
    """(qualified name, length in lines) of every function under ``tree``, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, (node.end_lineno or node.lineno) - node.lineno + 1
            yield from _lengths(node, name + ".")
        else:
            yield from _lengths(node, prefix)


def long_functions() -> Dict[str, int]:
    """Every function over LIMIT lines under ROOTS, as "path::name" -> lines."""
    found: Dict[str, int] = {}
    for root in ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if any(part.startswith(".") for part in rel.parts):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
            for name, lines in _lengths(tree):
                if lines > LIMIT:
                    found[f"{rel.as_posix()}::{name}"] = lines
    return found


def test_no_function_is_over_the_limit_without_a_reason() -> None:
    unexplained = {k: v for k, v in long_functions().items() if k not in LONG}
    assert not unexplained, (
        f"functions over {LIMIT} lines: {unexplained}; split them into named steps, or list them "
        "in LONG with the reason they stay long"
    )


def test_every_listed_exception_is_still_long() -> None:
    stale = sorted(set(LONG) - set(long_functions()))
    assert not stale, f"no longer over {LIMIT} lines (or gone): remove them from LONG: {stale}"


def test_the_measure_runs_from_def_and_counts_nested_functions() -> None:
    src = "@dec\ndef outer():\n    def inner():\n        return 1\n\n    return inner\n\nclass C:\n    def m(self):\n        pass\n"
    assert dict(_lengths(ast.parse(src))) == {"outer": 5, "outer.inner": 2, "C.m": 2}
