"""Launching the ``training.scale`` commands in W gloo processes, as torchrun would, for the
multi-process tests (tests/test_distributed_scale.py) and the scale benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from tests._fixtures_training import free_port, rank_env

REPO = Path(__file__).resolve().parents[1]


def launch_scale(
    world_size: int, commands: Sequence[Sequence[str]], work: Path, timeout: float = 300.0, threads: int = 1
) -> list[tuple[int, str, str]]:
    """Run each argv of ``commands`` through ``training.scale.main`` in ``world_size`` processes
    (one launch for all of them); returns each rank's (returncode, stdout, stderr tail)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / f"commands-{world_size}.json"
    spec.write_text(json.dumps([list(c) for c in commands]))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = rank_env(rank, world_size, port, RAYON_NUM_THREADS=str(threads))
        code = "from tests._fixtures_scale import worker; worker()"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, str(spec)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err[-3000:]))
    finally:
        for p in procs:  # a hung rank (a peer died) is ended here, by its own id
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def worker() -> None:
    """One rank: every command of the spec in order; a failing command ends the rank."""
    from training.scale import main

    for argv in json.loads(Path(sys.argv[1]).read_text()):
        code = main(argv)
        if code:
            sys.exit(code)


def check(results: list[tuple[int, str, str]]) -> list[Any]:
    """The ranks' results, raising with every rank's stderr if one failed."""
    if any(code != 0 for code, _, _ in results):
        raise AssertionError("\n".join(f"rank {r} exited {c}:\n{e}" for r, (c, _, e) in enumerate(results)))
    return results
