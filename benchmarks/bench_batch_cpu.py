"""Batched exact work on one thread, timed in CPU seconds: search Q=1000 and mining, leanclip
against faiss IndexFlatIP, numpy and the sgemm bound.

On a shared machine wall-clock ratios of multi-threaded libraries mostly measure how each one's
threads cope with the other jobs (OpenMP and OpenBLAS spin-wait, rayon does not). One thread per
library, measured in the process's own CPU time, compares the work each does per query and row
instead. Every measurement runs in its own subprocess (RAYON_NUM_THREADS, OMP_NUM_THREADS and
OPENBLAS_NUM_THREADS = 1); the peers take turns round by round and the best round counts.

Sizes: LEANCLIP_BENCH_BATCH_N (corpus rows for search, default 100,000), LEANCLIP_BENCH_BATCH_Q
(1,000), LEANCLIP_BENCH_BATCH_MINE (mining queries = rows, 20,000), rounds
LEANCLIP_BENCH_BATCH_ROUNDS (2). Writes ``benchmarks/results/batch_cpu.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks import _harness as H

DIM = 512
K = 10
GROUP = 5
ROOT = Path(__file__).resolve().parent.parent

SEARCH = ["leanclip f32", "leanclip f16", "leanclip i8", "faiss IndexFlatIP", "numpy"]
MINING = [
    "leanclip f32",
    "leanclip f32, i8 scan",
    "leanclip f32, bf16 scan",
    "faiss IndexFlatIP (k+5)",
    "numpy",
    "sgemm bound",
]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _numpy_topk(q: np.ndarray, x: np.ndarray, mask_groups=None) -> np.ndarray:
    out = np.empty((len(q), K), dtype=np.int64)
    for s in range(0, len(q), 1024):
        sc = q[s : s + 1024] @ x.T
        if mask_groups is not None:
            qg, cg = mask_groups
            sc[qg[s : s + 1024, None] == cg[None, :]] = -np.inf
        part = np.argpartition(-sc, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1)
        out[s : s + 1024] = np.take_along_axis(part, order, 1)
    return out


def worker(kind: str, name: str, n: int, q: int, out: str) -> None:
    """In a fresh single-threaded process: build the inputs, time one call in CPU seconds."""
    rng = np.random.default_rng(0)
    if kind == "search":
        x, queries = _unit(rng, n), _unit(rng, q)
        if name.startswith("leanclip"):
            import leanclip

            index = leanclip.Index(DIM, metric="ip", dtype=name.split()[-1])
            index.add(np.arange(n, dtype=np.uint64), x)
            call = lambda: index.search(queries, K)[0].astype(np.int64)  # noqa: E731
        elif name.startswith("faiss"):
            import faiss

            flat = faiss.IndexFlatIP(DIM)
            flat.add(x)
            call = lambda: flat.search(queries, K)[1]  # noqa: E731
        else:
            call = lambda: _numpy_topk(queries, x)  # noqa: E731
    else:
        x = _unit(rng, n)
        groups = np.arange(n, dtype=np.int64) // GROUP
        if name.startswith("leanclip"):
            import leanclip

            precision = "i8" if "i8" in name else "bf16" if "bf16" in name else "f32"
            call = lambda: leanclip.mine_hard_negatives(  # noqa: E731
                x, x, K, groups, groups, metric="ip", precision=precision
            )[0]
        elif name.startswith("faiss"):
            import faiss

            def call():
                flat = faiss.IndexFlatIP(DIM)
                flat.add(x)
                _, idx = flat.search(x, K + GROUP)
                same = groups[np.maximum(idx, 0)] == groups[:, None]
                keep = np.argsort(same, axis=1, kind="stable")[:, :K]
                return np.take_along_axis(idx, keep, axis=1)
        elif name == "numpy":
            call = lambda: _numpy_topk(x, x, (groups, groups))  # noqa: E731
        else:  # the sgemm bound: the products alone, in the same 1,024-row blocks

            def call():
                for s in range(0, n, 1024):
                    x[s : s + 1024] @ x.T
                return np.zeros((n, K), dtype=np.int64)

    t0 = time.process_time()
    rows = call()
    cpu = time.process_time() - t0
    np.save(out, np.asarray(rows, dtype=np.int64))
    print(json.dumps({"cpu": cpu}))


def _spawn(kind: str, name: str, n: int, q: int, out: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    code = f"from benchmarks.bench_batch_cpu import worker; worker({kind!r}, {name!r}, {n}, {q}, {out!r})"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} {name} failed:\n{p.stderr[-3000:]}")
    return float(json.loads(p.stdout.strip().splitlines()[-1])["cpu"])


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / K for x, y in zip(a, b)]))


def main(argv: Optional[Sequence[str]] = None) -> None:
    import tempfile

    started = time.perf_counter()
    n = int(os.environ.get("LEANCLIP_BENCH_BATCH_N", 100_000))
    q = int(os.environ.get("LEANCLIP_BENCH_BATCH_Q", 1_000))
    m = int(os.environ.get("LEANCLIP_BENCH_BATCH_MINE", 20_000))
    rounds = int(os.environ.get("LEANCLIP_BENCH_BATCH_ROUNDS", 2))
    best: Dict[tuple, float] = {}
    rows_of: Dict[tuple, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for kind, names, size, nq in (("search", SEARCH, n, q), ("mining", MINING, m, m)):
                for name in names:
                    out = os.path.join(tmp, f"{kind}-{len(rows_of)}.npy")
                    cpu = _spawn(kind, name, size, nq, out)
                    print(f"round {r + 1}: {kind} {name}: {cpu:.2f} CPU s", flush=True)
                    best[(kind, name)] = min(best.get((kind, name), float("inf")), cpu)
                    rows_of[(kind, name)] = np.load(out)
    lines: List[List[object]] = []
    s32 = best[("search", "leanclip f32")]
    fa = best[("search", "faiss IndexFlatIP")]
    for name in SEARCH:
        t = best[("search", name)]
        lines.append(
            [
                f"search {n:,} x {DIM}, Q={q}",
                name,
                t,
                s32 / t,
                fa / t,
                _agreement(rows_of[("search", name)], rows_of[("search", "numpy")]),
            ]
        )
    m32 = best[("mining", "leanclip f32")]
    mfa = best[("mining", "faiss IndexFlatIP (k+5)")]
    for name in MINING:
        t = best[("mining", name)]
        agree = (
            float("nan")
            if name == "sgemm bound"
            else _agreement(rows_of[("mining", name)], rows_of[("mining", "leanclip f32")])
        )
        lines.append([f"mining {m:,} x {m:,}", name, t, m32 / t, mfa / t, agree])
    bound = best[("mining", "sgemm bound")]
    notes = [
        f"search Q={q}: leanclip f32 {fa / s32:.2f}x faiss (target >= 1.1); f16 "
        f"{s32 / best[('search', 'leanclip f16')]:.2f}x and i8 {s32 / best[('search', 'leanclip i8')]:.2f}x "
        "our f32 (targets >= 1.6 / >= 2.5)",
        f"mining {m:,} x {m:,}: leanclip f32 {mfa / m32:.2f}x faiss (target >= 1.1), {m32 / bound:.2f}x the sgemm "
        f"bound's time (target <= 1.1); i8 scan {m32 / best[('mining', 'leanclip f32, i8 scan')]:.2f}x and bf16 "
        f"scan {m32 / best[('mining', 'leanclip f32, bf16 scan')]:.2f}x f32 mining's speed (targets >= 2.5 / >= 1.6)",
    ]
    text = H.header(
        "Batched exact work on one thread, in CPU seconds: leanclip vs faiss, numpy, the sgemm bound",
        ["faiss-cpu"],
        note=(
            f"dim {DIM}, top-{K}, inner product on random unit vectors; mining with groups of {GROUP}. One thread "
            "per library (RAYON/OMP/OPENBLAS_NUM_THREADS=1), each call in its own process, timed in that "
            f"process's CPU seconds; best of {rounds} rounds, the peers taking turns. 'agree' = top-{K} overlap "
            "with numpy (search) or leanclip f32 mining. sgemm bound = numpy's (OpenBLAS) products alone."
        ),
    )
    text += "\n" + H.markdown_table(
        ["workload", "library", "CPU s", "speed vs leanclip f32", "speed vs faiss", "agree"], lines
    )
    text += "\n\n" + "\n".join(f"- {x}" for x in notes)
    load = os.getloadavg()
    text += f"\n\nLoad average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.\n"
    text += f"\nTotal {time.perf_counter() - started:.0f} s.\n"
    H.write_result("batch_cpu", text)


if __name__ == "__main__":
    main()
