"""What a results file says about the machine, and its tables: one home for the research runs
(``training.minilm_stage1``, ``training.stage1_seeds``) and the benchmarks (``benchmarks/_harness``),
which import it from here (nothing imports the benchmarks). Standard library only."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

__all__ = ["cpu_model", "markdown_table"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with 3 significant digits below 1, 2 decimals below 10, 1 below
    100, thousands separators above; NaN as a dash."""

    def fmt(x: object) -> str:
        if isinstance(x, float):
            if x != x:
                return "–"
            if abs(x) >= 100:
                return f"{x:,.0f}"
            if abs(x) >= 10:
                return f"{x:.1f}"
            return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
