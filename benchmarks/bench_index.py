"""Exact top-10 search: leanclip.Index (f32 / f16 / i8) against numpy, faiss, usearch and hnswlib.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.bench_index``
(``--quick`` for a smaller smoke run). Writes ``benchmarks/results/index.md``.

All libraries run in this one process on the same data: N = 100,000 random unit vectors of
dim 512, inner product, top-10, one query at a time (Q=1) and batches of 1,000 (Q=1000).
Ratios (ours / peer) measured side by side are the figures to trust on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks._harness import current_rss_mb, header, markdown_table, timeit, write_result

DIM = 512
K = 10


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g.tolist()) & set(w.tolist())) / len(w) for g, w in zip(got, want)]))


def numpy_search(data: np.ndarray):
    def search(queries: np.ndarray) -> np.ndarray:
        scores = queries @ data.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        return np.take_along_axis(top, order, 1)

    return search


def peers(data: np.ndarray):
    """name -> (dtype, search(queries) -> (q, K) row ids), for every peer that is installed."""
    out = {"numpy": ("f32", numpy_search(data))}
    try:
        import faiss

        flat = faiss.IndexFlatIP(DIM)
        flat.add(data)
        out["faiss IndexFlatIP"] = ("f32", lambda q: flat.search(q, K)[1])
    except ImportError:
        pass
    try:
        from usearch.index import MetricKind
        from usearch.index import search as usearch_search

        data16 = data.astype(np.float16)
        # usearch does not scale floats into int8: scale all vectors by one factor ourselves
        scale = 127.0 / float(np.abs(data).max())
        data8 = np.round(data * scale).astype(np.int8)

        def make(dataset, convert):
            return lambda q: usearch_search(dataset, convert(q), K, MetricKind.IP, exact=True).keys

        out["usearch exact"] = ("f32", make(data, lambda q: q))
        out["usearch exact f16"] = ("f16", make(data16, lambda q: q.astype(np.float16)))
        out["usearch exact i8"] = ("i8", make(data8, lambda q: np.round(q * scale).astype(np.int8)))
    except ImportError:
        pass
    try:
        import hnswlib

        bf = hnswlib.BFIndex(space="ip", dim=DIM)
        bf.init_index(max_elements=len(data))
        bf.add_items(data, np.arange(len(data)))
        out["hnswlib BFIndex"] = ("f32", lambda q: bf.knn_query(q, k=K)[0])
    except ImportError:
        pass
    return out


@dataclass
class SearchRun:
    """The search workload every library answers, and the rows its timings fill."""

    queries: np.ndarray
    exact: np.ndarray
    slow_subset: int  # slow peers (per-query loops) answer the batch on this many queries
    rows: List[List[Any]] = field(default_factory=list)  # name, dtype, Q=1 ms, Q=1 QPS, Q=nq QPS, recall
    results: Dict[Tuple[str, str], Tuple[float, float]] = field(default_factory=dict)  # (Q=1, Q=nq) QPS

    def measure(self, name: str, dtype: str, search: Callable[[np.ndarray], Any], slow: bool = False) -> None:
        queries = self.queries
        single = timeit(lambda: search(queries[:1]), repeat=15, warmup=2, min_time=1.0)
        batch = queries[: self.slow_subset] if slow else queries
        many = timeit(lambda: search(batch), repeat=3, warmup=1)
        got = np.asarray(search(queries[:200]))
        r = recall(got, self.exact[:200])
        self.results[(name, dtype)] = (1.0 / single, len(batch) / many)
        self.rows.append([name, dtype, single * 1e3, 1.0 / single, len(batch) / many, r])
        print(
            f"  {name} {dtype}: Q=1 {single * 1e3:.2f} ms, Q={len(queries)} {len(batch) / many:,.0f} QPS, recall {r:.4f}",
            flush=True,
        )


def timed_add(make: Callable[[], Any], add: Callable[[Any], None]) -> Tuple[Any, float, float]:
    """(the index, seconds of its add, best seconds of 5 more adds into fresh indexes).

    On this VM a first touch of fresh memory can cost more than the add's own work (0.14-2.9M
    vectors/s seen for one call), which the best of several runs filters out; the first run is
    reported beside it."""
    index = make()
    t0 = time.perf_counter()
    add(index)
    first = time.perf_counter() - t0
    seconds = first
    for _ in range(5):
        again = make()
        t0 = time.perf_counter()
        add(again)
        seconds = min(seconds, time.perf_counter() - t0)
        del again
    return index, first, seconds


def measure_all(run: SearchRun, data: np.ndarray) -> Tuple[List[List[Any]], Dict[str, Any]]:
    """Add and search timings of leanclip per dtype, then every peer: (add rows, our indexes)."""
    from leanclip import Index

    n = len(data)
    keys = np.arange(n, dtype=np.uint64)
    add_rows: List[List[Any]] = []
    indexes = {}
    for dtype in ("f32", "f16", "i8"):
        index, first, seconds = timed_add(
            lambda dt=dtype: Index(DIM, "ip", dt), lambda ix: ix.add(keys, data)
        )
        add_rows.append([f"leanclip {dtype}", n / seconds, n / first])
        indexes[dtype] = index
        run.measure("leanclip", dtype, lambda q, ix=index: ix.search(q, k=K)[0].astype(np.int64))

    for name, (dtype, search) in peers(data).items():
        slow = name.startswith(("usearch", "hnswlib"))
        run.measure(name, dtype, search, slow=slow)
    try:
        import faiss

        _, first, seconds = timed_add(lambda: faiss.IndexFlatIP(DIM), lambda ix: ix.add(data))
        add_rows.append(["faiss IndexFlatIP (reference)", n / seconds, n / first])
    except ImportError:
        pass
    return add_rows, indexes


def ratios(results: Dict[Tuple[str, str], Tuple[float, float]]) -> Tuple[List[List[Any]], List[str]]:
    """Ours / peer, per workload; the fastest f32 peer is the bar for every dtype."""
    f32_peers = {k: v for k, v in results.items() if k[0] != "leanclip" and k[1] == "f32"}
    best1 = max(v[0] for v in f32_peers.values())
    bestq = max(v[1] for v in f32_peers.values())
    ratio_rows = []
    for dtype in ("f32", "f16", "i8"):
        ours = results[("leanclip", dtype)]
        row = [f"leanclip {dtype}", ours[0] / best1, ours[1] / bestq]
        for (name, pd), (p1, pq) in results.items():
            if name != "leanclip" and pd == "f32":
                row += [ours[0] / p1, ours[1] / pq]
        ratio_rows.append(row)
    peer_names = [name for (name, pd) in results if name != "leanclip" and pd == "f32"]
    return ratio_rows, peer_names


def save_big(big_n: int, path: Path) -> float:
    """Build a big_n x DIM f16 index in chunks and save it to path: the save's seconds."""
    from leanclip import Index

    big = Index(DIM, "ip", "f16")
    chunk_rng = np.random.default_rng(1)
    for start in range(0, big_n, 100_000):
        big.add(np.arange(start, start + 100_000), unit_vectors(chunk_rng, 100_000))
    return timeit(lambda: big.save(path), repeat=1, warmup=0)


def big_mmap(tmp: Path, queries: np.ndarray) -> Tuple[List[Any], float, float]:
    """A 1M x DIM f16 index saved and mapped: (its io row, Q=1 search ms, lazy load + lookup s)."""
    from leanclip import Index

    big_n = 1_000_000
    path = tmp / "big-f16.lcx"
    save = save_big(big_n, path)
    gc.collect()
    mmap_lazy = timeit(lambda: Index.load(path, mmap=True, verify=False), repeat=5, warmup=1)
    mmap_verified = timeit(lambda: Index.load(path, mmap=True), repeat=3, warmup=1)
    opened = Index.load(path, mmap=True, verify=False)
    first = timeit(lambda: opened.search(queries[0], k=K), repeat=5, warmup=1)
    lookup = timeit(lambda: 5 in Index.load(path, mmap=True, verify=False), repeat=3, warmup=1)
    row = [
        f"{big_n:,} x {DIM} f16",
        path.stat().st_size / 2**20,
        save,
        float("nan"),
        mmap_verified,
        mmap_lazy,
    ]
    return row, first * 1e3, lookup


def save_load(
    indexes: Dict[str, Any], n: int, queries: np.ndarray, big: bool
) -> Tuple[List[List[Any]], float, float]:
    """Save / load timings per dtype (the indexes are freed after), and the 1M mmap test if big."""
    from leanclip import Index

    io_rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("LEANCLIP_BENCH_TMP")) as tmp:
        for dtype, index in indexes.items():
            path = Path(tmp) / f"{dtype}.lcx"
            save = timeit(lambda: index.save(path), repeat=3, warmup=0)
            load = timeit(lambda: Index.load(path), repeat=3, warmup=1)
            mmap_verified = timeit(lambda: Index.load(path, mmap=True), repeat=5, warmup=1)
            mmap_lazy = timeit(lambda: Index.load(path, mmap=True, verify=False), repeat=5, warmup=1)
            io_rows.append(
                [f"{n:,} x {DIM} {dtype}", path.stat().st_size / 2**20, save, load, mmap_verified, mmap_lazy]
            )
        indexes.clear()
        gc.collect()
        if big:
            row, big_search_ms, big_lookup_s = big_mmap(Path(tmp), queries)
            io_rows.append(row)
        else:
            big_search_ms = big_lookup_s = float("nan")
    return io_rows, big_search_ms, big_lookup_s


def report(
    run: SearchRun,
    add_rows: List[List[Any]],
    io: Tuple[List[List[Any]], float, float],
    n: int,
) -> str:
    import leanclip

    nq, slow_subset, results = len(run.queries), run.slow_subset, run.results
    io_rows, big_search_ms, big_lookup_s = io
    ratio_rows, peer_names = ratios(results)
    text = header(
        "Exact search: leanclip.Index vs numpy, faiss, usearch, hnswlib",
        packages=["faiss-cpu", "usearch", "hnswlib"],
        note=(
            f"N = {n:,} random unit vectors, dim {DIM}, inner product, top-{K}; Q=1: one query per "
            f"call (median of >= 15); Q={nq}: one batch of {nq} (usearch and hnswlib, which loop "
            f"per query, answer the first {slow_subset} of them). leanclip SIMD level: "
            f"{leanclip._engine.simd_level()}. recall@10 is against exact f32 on 200 queries. "
            "The machine is shared: compare ratios within this run, not absolute times."
        ),
    )
    text += "\n## Search\n\n" + markdown_table(
        ["library", "storage", "Q=1 ms", "Q=1 QPS", f"Q={nq} QPS", "recall@10"], run.rows
    )
    ratio_header = ["leanclip", "Q=1 vs fastest f32 peer", f"Q={nq} vs fastest f32 peer"]
    for name in peer_names:
        ratio_header += [f"Q=1 vs {name}", f"Q={nq} vs {name}"]
    text += "\n\n## Ratios (our QPS / peer QPS; > 1 means leanclip is faster)\n\n"
    text += markdown_table(ratio_header, [[r[0]] + [f"{x:.2f}x" for x in r[1:]] for r in ratio_rows])
    ours32 = results[("leanclip", "f32")]
    faiss_q = results.get(("faiss IndexFlatIP", "f32"), (float("nan"), float("nan")))[1]
    text += (
        f"\n\nBatched (Q={nq}): leanclip f32 {ours32[1] / faiss_q:.2f}x faiss IndexFlatIP (target >= 1.1); "
        f"f16 {results[('leanclip', 'f16')][1] / ours32[1]:.2f}x and i8 {results[('leanclip', 'i8')][1] / ours32[1]:.2f}x "
        "our own f32 (targets >= 1.6 and >= 2.5: the i8 batch runs VNNI products and the f16 one "
        "AVX512-BF16 products, each re-scored exactly, where the CPU has them).\n"
    )
    text += "\nTargets (issues 3, 15): f32 >= 1.0x the fastest f32 peer at Q=1 and >= 1.1x faiss at Q=1000; "
    text += "f16 >= 1.6x and i8 >= 2.5x the fastest f32 peer at Q=1.\n"
    text += "\n## Add throughput (vectors/s, one batch of N into a fresh index)\n\n" + markdown_table(
        ["index", "vectors/s (best of 6)", "vectors/s (first call)"], add_rows
    )
    text += (
        "\n\nTarget (issue 15): >= 1M vectors/s for every dtype. The first call into fresh memory "
        "also pays this VM's first-touch page faults, which vary from run to run by 10x and more."
    )
    text += "\n\n## Save and load (seconds, median)\n\n" + markdown_table(
        [
            "index",
            "file MiB",
            "save (atomic)",
            "load (read)",
            "mmap load, verify=True",
            "mmap load, verify=False",
        ],
        io_rows,
    )
    text += (
        "\n\n`mmap=True, verify=False` checks the header, keys and scales (checksum) but neither reads "
        "nor checksums the vectors, and builds the key map on the first key lookup "
        "(`Index.verify()` checks both later); `verify=True` (the default) also checksums the "
        "vectors, reading the whole file once, and builds the key map. "
    )
    if big_search_ms == big_search_ms:
        text += (
            f"On the mapped 1M x {DIM} f16 index a Q=1 search took {big_search_ms:.1f} ms (median of 5), "
            f"and a lazy load followed by its first key lookup (which builds the key map) {big_lookup_s:.3f} s.\n"
        )
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N=20,000, Q=200, no 1M mmap test")
    parser.add_argument("--no-big", action="store_true", help="skip the 1M-vector mmap test")
    args = parser.parse_args(argv)
    n, nq = (20_000, 200) if args.quick else (100_000, 1000)

    rng = np.random.default_rng(0)
    data = unit_vectors(rng, n)
    queries = unit_vectors(rng, nq)
    exact = numpy_search(data)(queries)
    run = SearchRun(queries, exact, slow_subset=nq // 5)
    add_rows, indexes = measure_all(run, data)
    io = save_load(indexes, n, queries, big=not (args.quick or args.no_big))
    text = report(run, add_rows, io, n)
    text += f"\nprocess RSS at the end: {current_rss_mb():.0f} MiB\n"
    write_result("index", text)


if __name__ == "__main__":
    main()
