"""Run the project's benchmarks: ``python -m benchmarks [names...]``.

Every ``benchmarks/bench_<name>.py`` is a module with a ``main()`` that measures leanclip next to
its peers in one process and writes ``benchmarks/results/<name>.md`` through ``_harness``. Each
runs in its own subprocess (a clean heap, its own peak RSS, one crash does not stop the others).
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from those subprocesses only: some machines set
them and they slow OpenBLAS's sgemm, which would flatter us against numpy and faiss.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def discover() -> Dict[str, Path]:
    """name -> file for every benchmarks/bench_<name>.py."""
    return {p.stem[len("bench_") :]: p for p in sorted(HERE.glob("bench_*.py"))}


def bench_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    # the benchmarks import the `benchmarks` package from the checkout
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def run_one(name: str, timeout: Optional[float]) -> int:
    # argv as the results header should show it (_harness records sys.argv)
    # main(argv) gets no arguments of its own: sys.argv is the runner's (for the header), which a
    # benchmark's parser must not read ("unrecognized arguments: benchmarks index").
    code = (
        f"import inspect, sys; sys.argv = ['-m', 'benchmarks', {name!r}]; import benchmarks.bench_{name} as m; "
        "m.main([]) if inspect.signature(m.main).parameters else m.main()"
    )
    print(f"=== bench_{name} ===", flush=True)
    started = time.perf_counter()
    try:
        rc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=bench_env(), timeout=timeout
        ).returncode
    except subprocess.TimeoutExpired:
        print(f"=== bench_{name}: timed out after {timeout:.0f} s ===", flush=True)
        return 124
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    print(f"=== bench_{name}: {status} in {time.perf_counter() - started:.0f} s ===", flush=True)
    return rc


def main(argv: Optional[Sequence[str]] = None) -> int:
    found = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(found)})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(found))
        return 0
    names: List[str] = [n[len("bench_") :] if n.startswith("bench_") else n for n in args.names] or list(
        found
    )
    unknown = [n for n in names if n not in found]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(found)}")
    failed = [n for n in names if run_one(n, args.timeout) != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"results in {HERE / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
