"""Hard-negative mining: leanclip.mine_hard_negatives against numpy and faiss, and the GEMM bound.

Sizes: LEANCLIP_BENCH_MINING_SIZES="20000,100000" (all peers and f16 inputs at the first,
rounds at the first: LEANCLIP_BENCH_MINING_ROUNDS=3; a single size skips the second;
leanclip f32 and faiss at the second: the 2-core machine is shared and each 100k run takes minutes). Workload (the paper's per-epoch mining): top-10 of every query over the whole corpus, dim 512,
inner product on unit vectors, with groups of 5 (COCO: five captions per image; a corpus row in
the query's group is a positive and must not come back).

- numpy: blocks of 1,024 queries, one sgemm each, same-group entries set to -inf, argpartition,
  then a sort of the k survivors.
- faiss IndexFlatIP: faiss has no per-query exclusion, so it searches k + 5 (a query's group has
  at most 5 corpus rows, so k + 5 always leaves k eligible rows) and the group members are
  filtered out afterwards in numpy (included in its time).
- GEMM bound: 2*q*n*d flops at the best sgemm rate numpy reaches in this run; no exact top-k can
  beat the matrix product it is built on.

Every peer runs in its own subprocess so that its peak RSS (VmHWM) is its own; "extra MiB" is peak RSS
minus the RSS just before the call (inputs already built), i.e. the memory the call itself needs
beyond its inputs (its output included, 12 bytes per result).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from benchmarks import _harness as H

DIM = 512
K = 10
GROUP = 5
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- data


def make_data(q: int, n: int, half: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit queries and corpus (built in place: no float64 temporaries to inflate peak RSS)."""
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((q, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    corpus = rng.standard_normal((n, DIM), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    if half:
        queries, corpus = queries.astype(np.float16), corpus.astype(np.float16)
    return queries, corpus, np.arange(q, dtype=np.int64) // GROUP, np.arange(n, dtype=np.int64) // GROUP


# ----------------------------------------------------------------------------- peers


def run_leanclip(queries, corpus, qg, cg, half: bool, precision: str = "f32") -> np.ndarray:
    import leanclip

    rows, _ = leanclip.mine_hard_negatives(
        queries,
        corpus,
        K,
        query_groups=qg,
        corpus_groups=cg,
        metric="ip",
        dtype="f16" if half else "f32",
        precision=precision,
    )
    return rows


def run_leanclip_i8(queries, corpus, qg, cg, half: bool) -> np.ndarray:
    return run_leanclip(queries, corpus, qg, cg, half, precision="i8")


def run_leanclip_bf16(queries, corpus, qg, cg, half: bool) -> np.ndarray:
    return run_leanclip(queries, corpus, qg, cg, half, precision="bf16")


def run_numpy(queries, corpus, qg, cg, half: bool) -> np.ndarray:
    out = np.empty((len(queries), K), dtype=np.int64)
    block = 1024
    for s in range(0, len(queries), block):
        sc = queries[s : s + block] @ corpus.T
        sc[qg[s : s + block, None] == cg[None, :]] = -np.inf
        part = np.argpartition(-sc, K, axis=1)[:, :K]
        top = np.take_along_axis(sc, part, axis=1)
        order = np.lexsort((part, -top), axis=-1)  # best first, ties by row
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


def run_faiss(queries, corpus, qg, cg, half: bool) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(DIM)
    index.add(corpus)
    _, idx = index.search(queries, K + GROUP)
    same = cg[np.maximum(idx, 0)] == qg[:, None]
    keep = np.argsort(same, axis=1, kind="stable")[:, :K]  # eligible rows first, order kept
    return np.take_along_axis(idx, keep, axis=1)


PEERS = {
    "leanclip": run_leanclip,
    "leanclip-i8": run_leanclip_i8,
    "leanclip-bf16": run_leanclip_bf16,
    "numpy": run_numpy,
    "faiss": run_faiss,
}


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM), in MiB.

    Not ru_maxrss: Linux carries ru_maxrss over an exec from the forking parent, so a fresh
    subprocess would report at least its parent's size; VmHWM belongs to the new address space.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return H.peak_rss_mb()


def worker(peer: str, q: int, n: int, half: bool, repeats: int, out_path: str) -> None:
    """Runs in a fresh process: build inputs, time the peer, report JSON on the last line."""
    queries, corpus, qg, cg = make_data(q, n, half)
    fn = PEERS[peer]
    if peer == "faiss":
        import faiss  # noqa: F401  (import cost is not the peer's search time)
    if peer.startswith("leanclip"):
        import leanclip  # noqa: F401
    # The inputs' temporaries (normalizing makes a full-size copy) would otherwise set the peak:
    # "5" resets this process's VmHWM to its current RSS (Linux >= 4.0), so the peak below is
    # the call's own.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss_before = H.current_rss_mb()
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(queries, corpus, qg, cg, half)
        times.append(time.perf_counter() - t0)
    assert result is not None
    np.save(out_path, np.asarray(result, dtype=np.int64))
    print(json.dumps({"times": times, "rss_before": rss_before, "peak": peak_rss_mb()}))


def spawn(peer: str, q: int, n: int, half: bool, repeats: int, tmp: str) -> Dict:
    out = os.path.join(tmp, f"{peer}-{q}-{n}-{int(half)}.npy")
    code = (
        f"from benchmarks.bench_mining import worker; worker({peer!r}, {q}, {n}, {half}, {repeats}, {out!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{peer} q={q} n={n} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    # the first run warms caches and thread pools; the median of the rest is reported
    timed = info["times"][1:] or info["times"]
    info["time"] = float(np.median(timed))
    info["extra"] = info["peak"] - info["rss_before"]
    info["rows"] = np.load(out)
    return info


def sgemm_rate() -> float:
    """Best sgemm rate (flop/s) numpy reaches on blocks shaped like the mining products."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, DIM), dtype=np.float32)
    b = rng.standard_normal((20_000, DIM), dtype=np.float32)
    a @ b.T  # warm-up
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2.0 * a.shape[0] * b.shape[0] * DIM / best


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def topk_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of each query's top-k rows (as sets) that both results hold."""
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / len(y) for x, y in zip(a, b)]))


# label, peer, f16 inputs
PEER_RUNS: List[Tuple[str, str, bool]] = [
    ("leanclip f32", "leanclip", False),
    ("leanclip f32, i8 scan + f32 re-score", "leanclip-i8", False),
    ("leanclip f32, bf16 scan + f32 re-score", "leanclip-bf16", False),
    ("leanclip f16", "leanclip", True),
    ("numpy (blocked sgemm + argpartition)", "numpy", False),
    ("faiss IndexFlatIP (k+5, filtered)", "faiss", False),
]
BIG_PEER_RUNS = [PEER_RUNS[0], PEER_RUNS[1], PEER_RUNS[2], PEER_RUNS[5]]
Results = Dict[Tuple[str, int], Dict]  # (label, size) -> the peer's merged spawn() info


def run_schedule(schedule: List[Tuple[int, int, int, List[Tuple[str, str, bool]]]]) -> Results:
    """Every (size, rounds, repeats, peers) of the schedule; times are medians over rounds.

    Each peer runs in its own process (clean peak RSS), and the peers take turns round by
    round, so a change in the shared machine's load hits all of them alike: the ratios of the
    per-peer medians then hold even while absolute times wander."""
    res: Results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size, rounds, reps, group in schedule:
            for r in range(rounds):
                for label, peer, half in group:
                    print(f"mining: {label} {size:,} x {size:,} (round {r + 1}/{rounds}) ...", flush=True)
                    info = spawn(peer, size, size, half, reps, tmp)
                    print(
                        f"  {info['time']:.2f} s, peak {info['peak']:.0f} MiB, extra {info['extra']:.0f} MiB",
                        flush=True,
                    )
                    prev = res.get((label, size))
                    if prev is None:
                        info["round_times"] = [info["time"]]
                        res[(label, size)] = info
                    else:
                        prev["round_times"].append(info["time"])
                        prev["peak"] = max(prev["peak"], info["peak"])
                        prev["extra"] = max(prev["extra"], info["extra"])
            for (_label, s_), info in res.items():
                if s_ == size:
                    info["time"] = float(np.median(info["round_times"]))
    return res


def size_rows(res: Results, size: int, bound: float) -> List[List]:
    """The table rows of one size: every peer, then the GEMM bound."""
    rows = []
    ref = res[("leanclip f32", size)]
    for (label, s), info in res.items():
        if s != size:
            continue
        rows.append(
            [
                f"{size:,} x {size:,}",
                label,
                info["time"],
                bound / info["time"],
                info["time"] / ref["time"],
                agreement(info["rows"], ref["rows"]),
                info["peak"],
                info["extra"],
            ]
        )
    rows.append(
        [
            f"{size:,} x {size:,}",
            "GEMM bound (2qnd / sgemm rate)",
            bound,
            1.0,
            bound / ref["time"],
            float("nan"),
            float("nan"),
            float("nan"),
        ]
    )
    return rows


def size_note(res: Results, size: int, bound: float) -> str:
    """One size's ratios against its targets."""
    ref = res[("leanclip f32", size)]
    lc = ref["time"]
    fa = res[("faiss IndexFlatIP (k+5, filtered)", size)]["time"]
    line = (
        f"{size:,}: leanclip f32 is {fa / lc:.2f}x faiss (target >= 1.1), "
        f"{bound / lc:.2f} of the GEMM bound's speed, i.e. {lc / bound:.2f}x its time (target <= 1.1)"
    )
    for label, scan, target in (
        ("i8", "leanclip f32, i8 scan + f32 re-score", 2.5),
        ("bf16", "leanclip f32, bf16 scan + f32 re-score", 1.6),
    ):
        if (scan, size) in res:
            lp = res[(scan, size)]
            line += (
                f"; {label} scan {lc / lp['time']:.2f}x f32 mining's speed (target >= {target}), "
                f"top-{K} agreement with f32 {topk_agreement(lp['rows'], ref['rows']):.4f} (target >= 0.999), "
                f"extra {lp['extra']:.0f} MiB"
            )
    if ("leanclip f16", size) in res:
        line += f", f16 {lc / res[('leanclip f16', size)]['time']:.2f}x f32's speed (target >= 1.0)"
    if ("numpy (blocked sgemm + argpartition)", size) in res:
        line += (
            f", {res[('numpy (blocked sgemm + argpartition)', size)]['time'] / lc:.2f}x numpy (target >= 1.3)"
        )
    return line


def report(res: Results, rate: float, small: int, big: Optional[int], rounds_small: int) -> str:
    rows = []
    notes = []
    for size in [x for x in (small, big) if x]:
        bound = 2.0 * size * size * DIM / rate
        rows += size_rows(res, size, bound)
        notes.append(size_note(res, size, bound))
    last = big or small
    top = res[("leanclip f32", last)]
    io_mb = (2 * last * DIM * 4 + last * K * 12) / 2**20
    notes.append(
        f"{last:,} x {last:,} leanclip f32: peak RSS {top['peak']:.0f} MiB with {io_mb:.0f} MiB of inputs and "
        f"output; the call itself added {top['extra']:.0f} MiB over the RSS before it (target < 256 MB, "
        f"output included)"
    )
    text = H.header(
        "Hard-negative mining: leanclip vs numpy vs faiss",
        ["faiss-cpu"],
        note=(
            f"dim {DIM}, top-{K}, inner product on random unit vectors, groups of {GROUP} (a corpus row in "
            f"the query's group is skipped). sgemm rate measured here: {rate / 1e9:.0f} GFLOP/s. "
            "faiss searches k+5 and drops group members afterwards (exact: a group has 5 rows). "
            f"Each peer runs in its own process and the peers take turns ({rounds_small} rounds at {small:,}, each a "
            f"warm-up run then a timed run; one single run each at {big or 0:,}); times are medians over rounds. "
            "'agree' = fraction of result slots equal to leanclip f32's. "
            "'extra MiB' = peak RSS minus RSS just before the call."
        ),
    )
    head = [
        "q x n",
        "peer",
        "time s",
        "speed vs GEMM bound",
        "time / leanclip f32",
        "agree",
        "peak RSS MiB",
        "extra MiB",
    ]
    text += "\n" + H.markdown_table(head, rows) + "\n\n" + "\n".join(f"- {x}" for x in notes)
    load = os.getloadavg()
    text += f"\n\nLoad average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores (other jobs share this machine).\n"
    return text


def main() -> None:
    started = time.perf_counter()
    rate = sgemm_rate()
    print(f"sgemm: {rate / 1e9:.0f} GFLOP/s", flush=True)
    sizes = [int(x) for x in os.environ.get("LEANCLIP_BENCH_MINING_SIZES", "20000,100000").split(",")]
    small, big = sizes[0], (sizes[1] if len(sizes) > 1 else None)
    rounds_small = int(os.environ.get("LEANCLIP_BENCH_MINING_ROUNDS", "3"))
    schedule = [
        (size, rounds, reps, group)
        for size, rounds, reps, group in ((small, rounds_small, 2, PEER_RUNS), (big, 1, 1, BIG_PEER_RUNS))
        if size
    ]
    res = run_schedule(schedule)
    text = report(res, rate, small, big, rounds_small)
    text += f"\nTotal {time.perf_counter() - started:.0f} s.\n"
    H.write_result("mining", text)


if __name__ == "__main__":
    main()
