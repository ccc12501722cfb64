"""ApproxIndex (leanclip's usearch HNSW wrapper) against usearch used directly and hnswlib.

For each data set (random unit vectors: the worst case for HNSW; clustered unit vectors: closer to
real embeddings) and size N: build throughput (vectors/s), QPS for Q=1000 queries, recall@10
against exact search (numpy), at two search depths (ef). All three use M=16, efConstruction=128,
cosine. Wrapper overhead is measured on the same graph: ApproxIndex.search against a direct call
of the usearch index it wraps, so the only difference is our Python layer.

Sizes: LEANCLIP_BENCH_APPROX_SIZES (default "100000"); data sets: LEANCLIP_BENCH_APPROX_KINDS
(default "random,clustered"). A 1,000,000 x 512 HNSW build takes 10-20 minutes per library on
the 2-core machine, so 1M is opt-in and written to its own file, results/approx-1m.md:
LEANCLIP_BENCH_APPROX_SIZES=1000000 LEANCLIP_BENCH_APPROX_KINDS=clustered python -m benchmarks approx
"""

from __future__ import annotations

import os
import time
from typing import Dict, List, Tuple

import numpy as np

from benchmarks import _harness as H

DIM = 512
Q = 1000
K = 10
M = 16
EF_ADD = 128
EFS = (64, 256)


def random_unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_unit(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    """Points around shared centers (noise norm ~0.6 against unit centers), normalized."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centers), size=n)
    x = centers[labels] + rng.standard_normal((n, DIM), dtype=np.float32) * np.float32(0.6 / np.sqrt(DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_top(queries: np.ndarray, data: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 250):
        sc = queries[s : s + 250] @ data.T
        part = np.argpartition(-sc, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sc, part, axis=1), axis=1)
        out[s : s + 250] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    found = found.astype(np.int64)
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth))
    return hits / truth.size


def run_size(kind: str, n: int, rows: List[list], notes: List[str], build_direct: bool) -> None:
    import hnswlib
    from usearch.index import Index as UIndex

    from leanclip.approx import ApproxIndex

    if kind == "random":
        data, queries = random_unit(n, 1), random_unit(Q, 2)
    else:
        centers = random_unit(max(n // 100, 10), 3)
        data, queries = clustered_unit(n, 4, centers), clustered_unit(Q, 5, centers)
    keys = np.arange(n, dtype=np.uint64)
    truth = exact_top(queries, data, K)

    # builds (one each: a build of 100k takes minutes)
    ours = ApproxIndex(DIM, "cos", "f32", connectivity=M, expansion_add=EF_ADD, expansion_search=EFS[0])
    t0 = time.perf_counter()
    ours.add(keys, data)
    t_ours = time.perf_counter() - t0
    print(f"  leanclip ApproxIndex built: {n / t_ours:,.0f} vectors/s", flush=True)

    direct = None
    t_direct = float("nan")
    if build_direct:  # the build overhead is measured once per size; search overhead on every set
        direct = UIndex(ndim=DIM, metric="cos", dtype="f32", connectivity=M, expansion_add=EF_ADD)
        t0 = time.perf_counter()
        direct.add(keys, data)
        t_direct = time.perf_counter() - t0
        print(f"  usearch built: {n / t_direct:,.0f} vectors/s", flush=True)

    hn = hnswlib.Index(space="cosine", dim=DIM)
    hn.init_index(max_elements=n, M=M, ef_construction=EF_ADD, random_seed=1)
    t0 = time.perf_counter()
    hn.add_items(data, np.arange(n))
    t_hn = time.perf_counter() - t0
    print(f"  hnswlib built: {n / t_hn:,.0f} vectors/s", flush=True)

    per_ef: Dict[str, Dict[int, Tuple[float, float]]] = {"ours": {}, "same": {}, "direct": {}, "hnswlib": {}}
    inner = ours._index  # the usearch index ApproxIndex wraps: same graph, no wrapper
    for ef in EFS:
        ours.expansion_search = ef
        res = {}
        res["ours"] = (lambda: ours.search(queries, K)[0], None)
        res["same"] = (lambda: inner.search(queries, K).keys, None)
        if direct is not None:
            direct.expansion_search = ef  # type: ignore[misc]  # usearch declares the setter apart from the getter
            res["direct"] = (lambda: direct.search(queries, K).keys, None)
        hn.set_ef(max(ef, K))
        res["hnswlib"] = (lambda: hn.knn_query(queries, K)[0], None)
        # interleave repeats so that load from other users hits every library alike
        times: Dict[str, List[float]] = {name: [] for name in res}
        found: Dict[str, np.ndarray] = {}
        for rep in range(6):
            for name, (fn, _) in res.items():
                t0 = time.perf_counter()
                found[name] = np.asarray(fn())
                if rep:  # first round warms caches
                    times[name].append(time.perf_counter() - t0)
        for name in res:
            per_ef[name][ef] = (Q / float(np.median(times[name])), recall(found[name], truth))

    def row(label: str, key: str, build_s: float) -> list:
        r = [kind, f"{n:,}", label, n / build_s if build_s == build_s else float("nan")]
        for ef in EFS:
            qps, rec = per_ef[key].get(ef, (float("nan"), float("nan")))
            r += [qps, rec]
        return r

    rows.append(row("leanclip ApproxIndex", "ours", t_ours))
    rows.append(row("usearch (same graph)", "same", float("nan")))
    if direct is not None:
        rows.append(row("usearch (own build)", "direct", t_direct))
    rows.append(row("hnswlib", "hnswlib", t_hn))
    for ef in EFS:
        ov = per_ef["same"][ef][0] / per_ef["ours"][ef][0] - 1.0
        notes.append(f"{kind} N={n:,} ef={ef}: search overhead vs usearch on the same graph {ov:+.1%}")
    if direct is not None:
        notes.append(
            f"{kind} N={n:,}: build time ours / usearch {t_ours / t_direct:.3f} ({t_ours / t_direct - 1:+.1%})"
        )
    print("\n".join(notes[-3:]), flush=True)


def main() -> None:
    sizes = [int(s) for s in os.environ.get("LEANCLIP_BENCH_APPROX_SIZES", "100000").split(",") if s]
    kinds = [k for k in os.environ.get("LEANCLIP_BENCH_APPROX_KINDS", "random,clustered").split(",") if k]
    for k in kinds:
        if k not in ("random", "clustered"):
            raise SystemExit(f"LEANCLIP_BENCH_APPROX_KINDS: unknown data set {k!r} (random, clustered)")
    rows: List[list] = []
    notes: List[str] = []
    started = time.perf_counter()
    for n in sizes:
        for i, kind in enumerate(kinds):
            print(f"approx: {kind} N={n:,} ...", flush=True)
            run_size(kind, n, rows, notes, build_direct=i == 0)
    head = ["data", "N", "library", "build vectors/s"]
    for ef in EFS:
        head += [f"QPS ef={ef} (Q={Q})", f"recall@10 ef={ef}"]
    text = H.header(
        "Approximate search: leanclip ApproxIndex vs usearch vs hnswlib",
        ["usearch", "hnswlib"],
        note=(
            f"dim {DIM}, cosine, M={M}, efConstruction={EF_ADD}, {os.cpu_count()} threads; recall@10 "
            "against exact numpy search. 'usearch (same graph)' queries the very index ApproxIndex "
            "wraps, so its QPS ratio is our wrapper's overhead. Clustered: N/100 unit centers, "
            "noise of norm ~0.6, normalized; random unit vectors are HNSW's worst case."
        ),
    )
    text += "\n" + H.markdown_table(head, rows) + "\n\n" + "\n".join(f"- {x}" for x in notes)
    load = os.getloadavg()
    text += f"\n\nLoad average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores (other jobs share this machine).\n"
    text += (
        f"\nSizes run: {', '.join(f'{n:,}' for n in sizes)}; data sets: {', '.join(kinds)} "
        f"(LEANCLIP_BENCH_APPROX_KINDS); total {time.perf_counter() - started:.0f} s.\n"
    )
    if 1_000_000 not in sizes:
        text += "\nN=1,000,000 is opt-in (a build takes 10-20 minutes per library here): see results/approx-1m.md.\n"
    H.write_result("approx" if sizes == [100_000] else "approx-" + "-".join(_short(n) for n in sizes), text)


def _short(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


if __name__ == "__main__":
    main()
