"""The runner (``python -m benchmarks <name>``) leaves ``sys.argv`` as its own for the results
header and calls ``main([])``: a benchmark whose parser read ``sys.argv`` failed with
"unrecognized arguments: benchmarks <name>". Checked on the source, without running them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = sorted(Path(__file__).resolve().parents[1].glob("bench_*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.stem)
def test_parsers_read_the_arguments_main_is_given(path: Path) -> None:
    tree = ast.parse(path.read_text())
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(mains) == 1, f"{path.name}: no main()"
    main = mains[0]
    parses = [
        n
        for n in ast.walk(main)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "parse_args"
    ]
    for call in parses:
        assert main.args.args, f"{path.name}: main() parses arguments but takes none"
        assert call.args, f"{path.name}: parse_args() reads sys.argv, not main's argv"
