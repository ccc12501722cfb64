"""leanclip.IVFIndex against hnswlib, usearch, faiss IVFFlat, faiss IVF-SQ8 and faiss HNSW.

Data sets (unit vectors, inner product = cosine for every library):
- ``minilm``: MiniLM-L6 sentence embeddings (dim 384) of real sentences found on this machine,
  cached by ``python -m benchmarks.data.minilm_embeddings`` (queries: held-out sentences). The
  cached sentences are shuffled; ``minilm:n`` stores the first n, the next 5,000 are the held-out
  queries (the first 1,000 of them timed) and the 1,000 after those the ``tune_queries``
  (``minilm:auto``: n = the 200,000 cached less those 6,000 = 194,000);
- ``clustered``, ``powerlaw``, ``neardup``, ``random``: the seeded shapes of
  ``benchmarks/data/shapes.py`` (tight isotropic clusters; a power-law-spectrum mixture with
  unbalanced clusters; the same with bursts of near duplicates; uniform on the sphere).

Each data set holds 1,000 held-out queries, timed and measured at every setting
(``queries``), 4,000 more (``more_queries``; synthetic shapes: ``shapes.more_queries``, stream 1)
and 1,000 more for ``tune(queries=...)`` (``tune_queries``), all disjoint.

``lean-auto`` is ``IVFIndex(dim, "ip")`` with every knob chosen by the index, then
``tune(target)`` for 0.9, 0.95 and 0.99 on held-out stored vectors (``lean-auto-q``: on the
``tune_queries``); each target is one point, timed on the 1,000 held-out queries like the
sweeps (its ratios to hnswlib are at the recall those reached), with what tune expected
(recall and spread), its time, and the settings it chose. Whether tune landed within +-0.01
of its target is judged on all 5,000 held-out queries, batch and single: on 1,000 the
recall's own noise (1.96 standard errors, MiniLM: +-0.010 at 0.9) is as large as what it
judges, on 5,000 +-0.004 (``bench_tune_landing.py`` measures the landing over many draws).

Each library runs in its own process (a clean heap and its own peak RSS), one after the other.
A process loads the data, builds its index (timed: training + adding everything), then for each
search setting (ef / nprobe) measures QPS for one batch of Q=1000 queries and the mean latency
of the same 1,000 queries searched one at a time (Q=1), each with its own recall@10 against
exact search (they differ where single queries take another path: leanclip's codes, whose
shortlist is a second knob swept for Q=1). It also reports the peak RSS growth
over the loaded data, the bytes of the saved index, and for the incremental libraries the time
to add 1% more vectors after the build (relative to the build). Ratios within one run are the
result: this machine is shared.

    python -m benchmarks.bench_ivf --data clustered:100000 --data random:50000 --data minilm:auto

Writes benchmarks/results/ivf.md (one section per data set) and ivf.png (recall vs QPS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.report import markdown_table  # one home, shared with training's reports

CACHE = Path.home() / ".cache" / "leanclip-bench" / "ivf"
K = 10
Q = 1000
LANDING = 5000  # held-out queries tune's landing is judged on (the Q timed ones first)
THREADS = 2
M = 16
EF_CONSTRUCTION = 128
# Both sweeps step by at most ~1.33x above 32, so neither side's best point at a recall
# threshold depends much on where a sweep happens to land.
EFS = (16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512)
NPROBES = (
    1,
    2,
    4,
    8,
    16,
    24,
    32,
    40,
    48,
    64,
    80,
    96,
    112,
    128,
    160,
    192,
    224,
    256,
    288,
    320,
    352,
    384,
    448,
    512,
)
# leanclip with codes: single queries re-score `shortlist` candidates, swept at each nprobe
# (tight clusters need long shortlists, real embeddings about nprobe).
SHORTLISTS = (64, 96, 128, 192, 256, 384, 512, 1024)


# ---------------------------------------------------------------------------------------------
# Data


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _exact_top(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    from leanclip import Index

    exact = Index(base.shape[1], "ip")
    exact.add(np.arange(len(base), dtype=np.uint64), base)
    return np.asarray(exact.search(queries, k=K)[0], dtype=np.int64)


def make_data(kind: str, n: int) -> Path:
    """Writes (once) <cache>/<kind>-<n>-seed0.npz: base, queries (Q, timed) with their exact
    top-10 (truth), more_queries (LANDING - Q) with theirs (more_truth), tune_queries (Q).

    A synthetic file written before more_queries existed gets them added (its base, queries
    and tune_queries unchanged: hnswlib's rows measured on it stay comparable)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{kind}-{n}-seed0.npz"
    if path.exists():
        old = dict(np.load(path))
        if "more_queries" in old:
            return path
        if kind == "minilm":
            raise SystemExit(f"{path} has the old MiniLM split (no more_queries): delete it to re-split")
        data = old
    elif kind == "minilm":
        from benchmarks.data.minilm_embeddings import load

        allv = load(n + LANDING + Q)
        if len(allv) < n + LANDING + Q:
            raise SystemExit(f"only {len(allv)} MiniLM embeddings cached; need {n + LANDING + Q}")
        held = allv[n : n + LANDING]
        data = {"base": allv[:n], "queries": held[:Q], "tune_queries": allv[n + LANDING : n + LANDING + Q]}
        data["more_queries"] = held[Q:]
    else:
        from benchmarks.data.shapes import SHAPES, generate

        if kind not in SHAPES:
            raise SystemExit(f"unknown data set {kind!r}")
        base, both = generate(kind, n, 2 * Q, seed=0)
        data = {"base": base, "queries": both[:Q], "tune_queries": both[Q:]}
    if "more_queries" not in data:
        from benchmarks.data.shapes import more_queries

        data["more_queries"] = more_queries(kind, n, LANDING - Q, seed=0, stream=1)
    if "truth" not in data:
        data["truth"] = _exact_top(data["base"], data["queries"])
    data["more_truth"] = _exact_top(data["base"], data["more_queries"])
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # atomic: another run may read it
    np.savez(tmp, **data)
    tmp.rename(path)
    return path


def per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    found = np.asarray(found, dtype=np.int64).reshape(len(truth), -1)
    return np.array([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(found, truth)])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(per_query_recall(found, truth)))


# ---------------------------------------------------------------------------------------------
# One library per process


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_mb() -> float:
    """VmHWM: the peak RSS since the last ``reset_peak()``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def nlist_for(n: int) -> int:
    """About 2 x sqrt(n), a power of two (faiss's guidance is 1x-16x sqrt(n))."""
    return int(2 ** round(np.log2(2 * np.sqrt(n))))


class Peer:
    """build(base); add(more, start); settings(); set(value); search(queries) -> keys; save(path).

    single_settings(value) / set_single(sub): a second knob for single queries only (None:
    none; leanclip's codes: the shortlist)."""

    name = ""
    knob = ""

    def settings(self) -> List[int]:
        raise NotImplementedError

    def single_settings(self, v) -> List[Optional[int]]:
        return [None]

    def set_single(self, s) -> None:
        pass


class LeanIVF(Peer):
    knob = "nprobe"

    def __init__(self, dtype: str, rerank: int, nlist: int, codes: bool = False, half_dims: bool = False):
        self.dtype, self.rerank, self.nlist, self.codes = dtype, rerank, nlist, codes
        self.half_dims = half_dims
        self.name = f"leanclip IVF {dtype}" + (f" rerank={rerank}" if rerank else "")
        if codes:
            self.name += " + 4-bit codes"

    def build(self, base):
        from leanclip import IVFIndex

        # Codes: one 4-bit sub-quantizer per 4 dimensions (dim / 8 bytes a vector).
        pq = base.shape[1] // 4 if self.codes else 0
        # Batches rank by half the principal directions (re-scored from the rows).
        scan_dims = base.shape[1] // 2 if self.half_dims else 0
        if scan_dims:
            self.name += f" + scan_dims={scan_dims}"
        self.index = IVFIndex(
            base.shape[1],
            "ip",
            self.dtype,
            nlist=self.nlist,
            rerank=self.rerank,
            train_threshold=0,
            pq=pq,
            scan_dims=scan_dims,
        )
        self.index.train(base)
        self.index.add(np.arange(len(base), dtype=np.uint64), base)

    def add(self, more, start):
        self.index.add(np.arange(start, start + len(more), dtype=np.uint64), more)

    def settings(self):
        return [p for p in NPROBES if p <= self.nlist]

    def set(self, v):
        self.index.nprobe = v

    def single_settings(self, v):
        return list(SHORTLISTS) if self.codes else super().single_settings(v)

    def set_single(self, s):
        if s is not None:
            self.index.shortlist = s

    def search(self, q):
        return self.index.search(q, k=K)[0]

    def save(self, path):
        self.index.save(path)


class LeanAuto(Peer):
    """Defaults + tune: every knob chosen by the index, then tune(target) per point."""

    knob = "tune"

    def __init__(self, user_queries: bool, memory: Optional[str] = None):
        self.user_queries, self.memory = user_queries, memory
        self.name = "leanclip IVF auto + tune" + (" (sample queries)" if user_queries else "")
        if memory:
            self.name += f", memory={memory!r}"
        self.tune_queries = None
        self.last: Dict = {}

    def build(self, base):
        from leanclip import IVFIndex

        self.index = IVFIndex(base.shape[1], "ip", train_threshold=0, memory=self.memory)
        self.index.train(base)
        self.index.add(np.arange(len(base), dtype=np.uint64), base)

    def add(self, more, start):
        self.index.add(np.arange(start, start + len(more), dtype=np.uint64), more)

    def settings(self):
        return ["defaults", 0.9, 0.95, 0.99]

    def set(self, v):
        if v == "defaults":
            self.last = {"auto": list(self.index.auto)}
            return
        q = self.tune_queries if self.user_queries else None
        c0 = time.process_time()
        report = self.index.tune(v, k=K, queries=q)
        self.last = dict(report, cpu_seconds=time.process_time() - c0)

    def info(self):
        return dict(self.last, repr=repr(self.index))

    def search(self, q):
        return self.index.search(q, k=K)[0]

    def save(self, path):
        self.index.save(path)


class Hnswlib(Peer):
    name, knob = "hnswlib HNSW", "ef"

    def build(self, base):
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=base.shape[1])
        self.index.init_index(max_elements=int(len(base) * 1.02) + 10, M=M, ef_construction=EF_CONSTRUCTION)
        self.index.set_num_threads(THREADS)
        self.index.add_items(base, np.arange(len(base)))

    def add(self, more, start):
        self.index.add_items(more, np.arange(start, start + len(more)))

    def settings(self):
        return list(EFS)

    def set(self, v):
        self.index.set_ef(max(v, K))

    def search(self, q):
        return self.index.knn_query(q, k=K)[0]

    def save(self, path):
        self.index.save_index(path)


class USearch(Peer):
    name, knob = "usearch HNSW", "ef"

    def build(self, base):
        from usearch.index import Index

        self.index = Index(
            ndim=base.shape[1], metric="ip", dtype="f32", connectivity=M, expansion_add=EF_CONSTRUCTION
        )
        self.index.add(np.arange(len(base)), base, threads=THREADS)

    def add(self, more, start):
        self.index.add(np.arange(start, start + len(more)), more, threads=THREADS)

    def settings(self):
        return list(EFS)

    def set(self, v):
        self.index.expansion_search = max(v, K)

    def search(self, q):
        if q.ndim == 1:
            return self.index.search(q, K).keys
        return self.index.search(q, K, threads=THREADS).keys

    def save(self, path):
        self.index.save(path)


class Faiss(Peer):
    def __init__(self, kind: str, nlist: int = 0):
        self.kind, self.nlist = kind, nlist
        self.name = {"flat": "faiss IVFFlat", "sq8": "faiss IVF-SQ8", "hnsw": "faiss HNSW"}[kind]
        self.knob = "efSearch" if kind == "hnsw" else "nprobe"

    def build(self, base):
        import faiss

        faiss.omp_set_num_threads(THREADS)
        d = base.shape[1]
        if self.kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, M, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = EF_CONSTRUCTION
        else:
            quantizer = faiss.IndexFlatIP(d)
            if self.kind == "flat":
                self.index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                self.index = faiss.IndexIVFScalarQuantizer(
                    quantizer, d, self.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
                )
            self.quantizer = quantizer
            self.index.train(base)
        self.index.add(base)

    def add(self, more, start):
        self.index.add(more)

    def settings(self):
        return list(EFS) if self.kind == "hnsw" else [p for p in NPROBES if p <= self.nlist]

    def set(self, v):
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(v, K)
        else:
            self.index.nprobe = v

    def search(self, q):
        return self.index.search(q.reshape(-1, q.shape[-1]), K)[1]

    def save(self, path):
        import faiss

        faiss.write_index(self.index, path)


def make_peer(spec: str, n: int) -> Peer:
    nlist = nlist_for(n)
    return {
        "lean-f32": lambda: LeanIVF("f32", 0, nlist),
        "lean-i8": lambda: LeanIVF("i8", 0, nlist),
        "lean-i8-rerank": lambda: LeanIVF("i8", 40, nlist),
        "lean-i8-codes": lambda: LeanIVF("i8", 0, nlist, codes=True),
        "lean-f16": lambda: LeanIVF("f16", 0, nlist),
        "lean-f16-codes": lambda: LeanIVF("f16", 0, nlist, codes=True),
        "lean-f16-half": lambda: LeanIVF("f16", 0, nlist, half_dims=True),
        "lean-f16-codes-half": lambda: LeanIVF("f16", 0, nlist, codes=True, half_dims=True),
        "lean-i8-codes-half": lambda: LeanIVF("i8", 0, nlist, codes=True, half_dims=True),
        "lean-auto": lambda: LeanAuto(False),
        "lean-auto-q": lambda: LeanAuto(True),
        "lean-auto-low": lambda: LeanAuto(False, memory="low"),
        "hnswlib": Hnswlib,
        "usearch": USearch,
        "faiss-ivfflat": lambda: Faiss("flat", nlist),
        "faiss-ivfsq8": lambda: Faiss("sq8", nlist),
        "faiss-hnsw": lambda: Faiss("hnsw"),
    }[spec]()


def landing(peer: Peer, timed: Tuple[np.ndarray, np.ndarray], truth: np.ndarray, more: Tuple) -> Dict:
    """Recall on every held-out query: the Q timed (their answers ``timed``: batch, single)
    and ``more`` = (more_queries, more_truth) searched now, in batches of Q (as timed) and one
    at a time; with 1.96 standard errors of each mean."""
    queries, more_truth = more
    batch = [per_query_recall(timed[0], truth)]
    batch += [
        per_query_recall(peer.search(queries[i : i + Q]), more_truth[i : i + Q])
        for i in range(0, len(queries), Q)
    ]
    single = np.stack([np.asarray(peer.search(q)).reshape(-1)[:K] for q in queries])
    b = np.concatenate(batch)
    s = np.concatenate([per_query_recall(timed[1], truth), per_query_recall(single, more_truth)])
    return {
        "queries": len(b),
        "recall": float(b.mean()),
        "recall_single": float(s.mean()),
        "spread": float(1.96 * b.std(ddof=1) / np.sqrt(len(b))),
        "spread_single": float(1.96 * s.std(ddof=1) / np.sqrt(len(s))),
    }


def worker(spec: str, data_path: str, add_fraction: float) -> Dict:
    d = np.load(data_path)
    base, queries, truth = d["base"], d["queries"], d["truth"]
    tune_queries = d["tune_queries"] if "tune_queries" in d else None
    more = (d["more_queries"], d["more_truth"]) if "more_queries" in d else None
    n = len(base)
    n_build = n - int(n * add_fraction) if add_fraction else n
    reset_peak()  # loading the .npz peaks at twice the data: measure from here
    base_rss = rss_mb()
    load_start = os.getloadavg()[0]
    peer = make_peer(spec, n)
    if isinstance(peer, LeanAuto):
        peer.tune_queries = tune_queries
    t0, c0 = time.perf_counter(), time.process_time()
    peer.build(base[:n_build])
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    out: Dict = {"peer": peer.name, "knob": peer.knob, "n": n, "build_s": build_s, "build_cpu_s": build_cpu}
    if add_fraction:
        t0, c0 = time.perf_counter(), time.process_time()
        peer.add(base[n_build:], n_build)
        out["add_s"] = time.perf_counter() - t0
        out["add_cpu_s"] = time.process_time() - c0
        out["add_fraction"] = add_fraction
        out["n_build"] = n_build
    out["rss_growth_mb"] = peak_mb() - base_rss
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "index")
        peer.save(p)
        out["disk_mb"] = os.path.getsize(p) / 2**20
    points = []
    settings = peer.settings()
    # The first full batch after the build, timed apart: it pays one-time costs (page faults;
    # leanclip's IVF packs each i8 / f16 list for its batch product on first use).
    peer.set(settings[0])
    t0, c0 = time.perf_counter(), time.process_time()
    peer.search(queries)
    out["first_batch_s"], out["first_batch_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    for v in settings:
        peer.set(v)
        peer.search(queries)  # warm-up: one untimed batch at this setting
        t0, c0 = time.perf_counter(), time.process_time()
        found = peer.search(queries)
        batch_s, batch_cpu = time.perf_counter() - t0, time.process_time() - c0
        r = recall(found, truth)
        single = []
        for s in peer.single_settings(v):
            peer.set_single(s)
            found1 = np.empty((len(queries), K), dtype=np.int64)
            t0, c0 = time.perf_counter(), time.process_time()
            for i, q in enumerate(queries):
                found1[i] = np.asarray(peer.search(q)).reshape(-1)[:K]
            lat, lat_cpu = (time.perf_counter() - t0) / Q, (time.process_time() - c0) / Q
            single.append(
                {
                    "shortlist": s,
                    "recall": recall(found1, truth),
                    "latency_ms": lat * 1e3,
                    "latency_cpu_ms": lat_cpu * 1e3,
                }
            )
        points.append(
            {
                "setting": v,
                "recall": r,
                "qps1000": Q / batch_s,
                # CPU seconds of all threads: robust to other jobs on a loaded machine
                "qps1000_cpu": Q / batch_cpu,
                "single": single,
                **({"tune": peer.info()} if isinstance(peer, LeanAuto) else {}),
            }
        )
        if isinstance(peer, LeanAuto) and v != "defaults" and more is not None:
            points[-1]["landing"] = landing(peer, (found, found1), truth, more)
        if min(r, max(s["recall"] for s in single)) >= 0.999 and not isinstance(peer, LeanAuto):
            break
    out["points"] = points
    # after the searches: includes what a search keeps (leanclip's packed lists)
    out["rss_growth_after_search_mb"] = peak_mb() - base_rss
    # what the process still holds over the loaded data: the index and what its searches keep
    # (the peaks above include the build's transient buffers)
    out["rss_resident_mb"] = rss_mb() - base_rss
    out["load"] = [load_start, os.getloadavg()[0]]  # 1-min load average at start and end
    return out


# ---------------------------------------------------------------------------------------------
# Driver: peers in turn, table, plot

PEERS = [
    "lean-f32",
    "lean-f16",
    "lean-i8",
    "lean-i8-rerank",
    "lean-i8-codes",
    "lean-f16-codes",
    "lean-f16-half",
    "lean-f16-codes-half",
    "lean-i8-codes-half",
    "faiss-ivfflat",
    "faiss-ivfsq8",
    "hnswlib",
    "faiss-hnsw",
    "usearch",
]


def run_peer(spec: str, data_path: Path, add_fraction: float) -> Optional[Dict]:
    """Runs one peer in its own process. ``<peer>@before`` runs a leanclip peer on another
    build of leanclip, found first on the path ``$LEANCLIP_BENCH_BEFORE`` (a folder holding a
    ``leanclip`` package), and labels it "(before)": before/after figures in one run."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    root = Path(__file__).resolve().parent.parent
    before = spec.endswith("@before")
    if before:
        spec = spec[: -len("@before")]
    first = [os.environ["LEANCLIP_BENCH_BEFORE"]] if before else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*first, str(root), env.get("PYTHONPATH", "")]))
    env.setdefault("RAYON_NUM_THREADS", str(THREADS))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_ivf",
        "--worker",
        spec,
        "--data-path",
        str(data_path),
        "--add-fraction",
        str(add_fraction),
    ]
    print(f"  {spec} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if before:
        res["peer"] += " (before)"
    print(
        f"  {spec}: build {res['build_s']:.1f}s, {len(res['points'])} settings", file=sys.stderr, flush=True
    )
    return res


def points_for(res: Dict, key: str) -> List[Dict]:
    """The points that measured ``key``: batch points ({setting, recall, qps1000, qps1000_cpu})
    or single-query points ({setting, recall, latency_ms, latency_cpu_ms}, one per value of
    the single-query knob, each with the recall of the single queries). Results written
    before single queries had their own recall keep latency in the batch point."""
    if key.startswith("qps"):
        return [p for p in res["points"] if key in p]
    out = []
    for p in res["points"]:
        if key in p:  # the older format
            out.append(p)
        for s in p.get("single", []):
            setting = str(p["setting"]) + (
                f", shortlist={s['shortlist']}" if s["shortlist"] is not None else ""
            )
            out.append(dict(s, setting=setting))
    return out


def pareto(points: List[Dict], key: str) -> List[Dict]:
    """The points no other point beats on both recall and ``key``, by ascending recall. With
    two knobs (codes: nprobe and shortlist) a dominated point must not decide an
    interpolation or draw a zigzag."""
    better = (lambda a, b: a > b) if key.startswith("qps") else (lambda a, b: a < b)
    front: List[Dict] = []
    for p in sorted(points, key=lambda p: -p["recall"]):
        if not front or better(p[key], front[-1][key]):
            front.append(p)
    return front[::-1]


def best_at(res: Dict, target: float, key: str) -> Optional[Dict]:
    """The best point with recall >= target: highest QPS, or lowest latency."""
    ok = [p for p in points_for(res, key) if p["recall"] >= target]
    if not ok:
        return None
    return max(ok, key=lambda p: p[key]) if key.startswith("qps") else min(ok, key=lambda p: p[key])


def at_recall(r: Dict, target: float, key: str) -> Optional[float]:
    """``key`` at recall exactly ``target``: interpolated (log-linearly) between the two
    settings around it, so a setting that lands just below or above a threshold does not
    decide a ratio (the first setting's value when even it reaches ``target``). None if no
    setting reaches ``target``."""
    pts = pareto(points_for(r, key), key)
    if pts and target <= pts[0]["recall"]:  # even the cheapest setting swept reaches it
        return pts[0][key]
    for lo, hi in zip(pts, pts[1:]):
        if lo["recall"] <= target <= hi["recall"]:
            if hi["recall"] == lo["recall"]:
                return hi[key]
            t = (target - lo["recall"]) / (hi["recall"] - lo["recall"])
            return float(np.exp(np.log(lo[key]) * (1 - t) + np.log(hi[key]) * t))
    return None


def _peak_rss(r: Dict) -> float:
    """Peak RSS growth over the build and, where measured, the searches."""
    return max(r["rss_growth_mb"], r.get("rss_growth_after_search_mb", 0.0))


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "–"


def _bytes_per_vector(r: Dict, key: str) -> str:
    return f"{r[key] * 2**20 / r['n']:,.0f}" if key in r else "–"


def _vs_hnswlib(p: Dict, hn: Optional[Dict]) -> Tuple[Optional[float], Optional[float]]:
    """A tuned point against hnswlib at the recall it reached: (Q=1000 queries per CPU-s
    ratio, Q=1 speed-up), hnswlib's Pareto curves interpolated there."""
    if not hn:
        return None, None
    single = p["single"][0]
    hq = at_recall(hn, p["recall"], "qps1000_cpu")
    hl = at_recall(hn, single["recall"], "latency_cpu_ms")
    return (p["qps1000_cpu"] / hq if hq else None, hl / single["latency_cpu_ms"] if hl else None)


def _landing(p: Dict) -> Tuple[float, float]:
    """A tuned point's (batch, single) recall for the landing verdict: on every held-out
    query where measured (``landing``), else on the 1,000 timed (results before it)."""
    land = p.get("landing")
    if land:
        return land["recall"], land["recall_single"]
    return p["recall"], p["single"][0]["recall"]


def _landed(target: float, batch: float, single: float) -> str:
    """Whether held-out recall (batch, single) landed within +-0.01 of ``target``: "yes",
    "over" or "UNDER" (the worse of the two), with both recalls."""
    worst = min(batch, single) if min(batch, single) < target - 0.01 else max(batch, single)
    word = "yes" if abs(worst - target) <= 0.01 else ("over" if worst > target else "UNDER")
    return f"{word} ({batch:.3f} / {single:.3f})"


def targets_section(all_results: Dict[str, List[Dict]]) -> str:
    """One row per data set and automatic peer: the issue's targets as ratios to hnswlib."""
    rows = []
    for kind, results in all_results.items():
        hn = next((r for r in results if r["peer"] == "hnswlib HNSW"), None)
        for r in (r for r in results if r["knob"] == "tune"):
            tuned = {float(p["setting"]): p for p in r["points"] if p["setting"] != "defaults"}
            ratios = {t: _vs_hnswlib(p, hn) for t, p in tuned.items()}

            def fmt(t: float, i: int) -> str:
                v = ratios.get(t, (None, None))[i]
                return f"{v:.2f}x" if v else "–"

            within = [f"{t}: {_landed(t, *_landing(p))}" for t, p in tuned.items()]
            rows.append(
                [
                    f"{kind} {r['n']:,}",
                    r["peer"].replace("leanclip IVF ", ""),
                    fmt(0.95, 0),
                    fmt(0.99, 0),
                    fmt(0.95, 1),
                    fmt(0.99, 1),
                    f"{hn['build_cpu_s'] / r['build_cpu_s']:.1f}x" if hn else "–",
                    f"{_bytes_per_vector(r, 'rss_resident_mb')} vs {_bytes_per_vector(hn, 'rss_resident_mb')}"
                    if hn
                    else "–",
                    f"{_peak_rss(r) * 2**20 / r['n']:,.0f} vs {_peak_rss(hn) * 2**20 / hn['n']:,.0f}"
                    if hn
                    else "–",
                    f"{_bytes_per_vector(r, 'disk_mb')} vs {_bytes_per_vector(hn, 'disk_mb')}" if hn else "–",
                    ", ".join(within),
                    " / ".join(f"{x:.0f}" for x in r["load"] + (hn or {}).get("load", []))
                    if "load" in r
                    else "–",
                ]
            )
    if not rows:
        return ""
    return (
        "## Targets, every data set (defaults + tune against hnswlib M=16, efConstruction=128, ef swept)\n\n"
        "Ratios at the recall each tuned point reached on the held-out queries (hnswlib's Pareto "
        "curve interpolated there), CPU seconds. Batches: Q=1000 queries per CPU-s, target >= 2x; "
        "single queries: hnswlib's CPU ms / ours, target >= 1.0x at 0.95 and >= 0.8x at 0.99; "
        "build: hnswlib's build CPU-s / ours, target >= 5x; memory in bytes per vector, ours vs "
        "hnswlib's (resident: what the process holds at the end over the loaded data; peak: the "
        "build's and searches' high-water mark, training buffers included), target resident <= "
        "hnswlib's; tune: recall on every held-out query (5,000; the 1,000 timed where a run "
        "predates them) within +-0.01 of each target (batch / single; over: above the target by "
        "more, where one probe already gives more).\n\n"
        + markdown_table(
            [
                "data",
                "leanclip",
                "batch vs hnswlib at 0.95",
                "at 0.99",
                "single vs hnswlib at 0.95",
                "at 0.99",
                "build speed-up",
                "resident B/vector vs hnswlib",
                "peak B/vector vs hnswlib",
                "disk B/vector vs hnswlib",
                "tune within +-0.01",
                "load (1 min): ours start/end, hnswlib start/end",
            ],
            rows,
        )
        + "\n"
    )


def _search_table(results: List[Dict]) -> str:
    """Every peer's settings: batch (Q=1000) recall and throughput, single-query recall and latency."""
    rows = []
    for r in results:
        for p in r["points"]:
            singles = points_for({"points": [p]}, "latency_cpu_ms")
            first = singles[0] if singles else {}
            rows.append(
                [
                    r["peer"],
                    f"{r['knob']}={p['setting']}",
                    p["recall"],
                    p.get("qps1000_cpu", float("nan")),
                    p["qps1000"],
                    first.get("recall", float("nan")) if "single" in p else p["recall"],
                    first.get("latency_cpu_ms", float("nan")),
                    first.get("latency_ms", float("nan")),
                ]
            )
            for s in singles[1:]:  # more values of the single-query knob
                rows.append(
                    [
                        r["peer"],
                        f"{r['knob']}={s['setting']}",
                        "",
                        "",
                        "",
                        s["recall"],
                        s["latency_cpu_ms"],
                        s["latency_ms"],
                    ]
                )
    return markdown_table(
        [
            "library",
            "setting",
            "Q=1000: recall@10",
            "Q=1000: queries per CPU-s",
            "Q=1000: QPS (wall)",
            "Q=1: recall@10",
            "Q=1: CPU ms per query",
            "Q=1: wall ms per query",
        ],
        rows,
    )


def _build_table(results: List[Dict]) -> str:
    """Every peer's build time, memory, disk and incremental add."""
    rows = []
    for r in results:
        add = "–"
        if "add_s" in r:
            cpu = r.get("add_cpu_s")
            add = f"{100 * r['add_s'] / r['build_s']:.1f}% wall" + (
                f", {100 * cpu / r['build_cpu_s']:.1f}% CPU"
                if cpu is not None and r.get("build_cpu_s")
                else ""
            )
        rows.append(
            [
                r["peer"],
                r.get("build_cpu_s", float("nan")),
                r["build_s"],
                r["rss_growth_mb"],
                r.get("rss_growth_after_search_mb", float("nan")),
                f"{_peak_rss(r) * 2**20 / r['n']:,.0f}",
                _bytes_per_vector(r, "rss_resident_mb"),
                r["disk_mb"],
                _bytes_per_vector(r, "disk_mb"),
                add,
                " / ".join(f"{x:.1f}" for x in r["load"]) if "load" in r else "–",
            ]
        )
    return markdown_table(
        [
            "library",
            "build CPU (s)",
            "build wall (s)",
            "peak RSS growth (MiB)",
            "... after the searches (MiB)",
            "peak bytes / vector",
            "resident bytes / vector (at the end)",
            "on disk (MiB)",
            "on disk bytes / vector",
            "add 1% after build (of build)",
            "load (1 min) at start / end",
        ],
        rows,
    )


def _target_row(r: Dict, target: float, hn: Optional[Dict], faiss_ivf: List[Dict]) -> List:
    """One leanclip peer at one recall target against hnswlib and the best faiss IVF."""
    b = best_at(r, target, "qps1000_cpu")
    if b is None:
        return [r["peer"], target, "not reached", "", "", "", "", "", ""]
    bw = best_at(r, target, "qps1000")
    lat = best_at(r, target, "latency_cpu_ms")
    lat_s = f"{lat['latency_cpu_ms']:.3f} ({r['knob']}={lat['setting']})" if lat else "not reached"
    hb = best_at(hn, target, "qps1000_cpu") if hn else None
    hbw = best_at(hn, target, "qps1000") if hn else None
    hl = best_at(hn, target, "latency_cpu_ms") if hn else None
    fb = [x for x in (best_at(f, target, "qps1000_cpu") for f in faiss_ivf) if x]
    fbw = [x for x in (best_at(f, target, "qps1000") for f in faiss_ivf) if x]
    best_f = max((x["qps1000_cpu"] for x in fb), default=None)
    best_fw = max((x["qps1000"] for x in fbw), default=None)
    iq, ihq = at_recall(r, target, "qps1000_cpu"), hn and at_recall(hn, target, "qps1000_cpu")
    il, ihl = at_recall(r, target, "latency_cpu_ms"), hn and at_recall(hn, target, "latency_cpu_ms")
    return [
        r["peer"],
        target,
        f"{b['qps1000_cpu']:,.0f} ({r['knob']}={b['setting']})",
        f"{_ratio(iq, ihq)}; Q=1 {il:.3f} vs {ihl:.3f} ms" if iq and ihq and il and ihl else "–",
        f"{_ratio(b['qps1000_cpu'], hb and hb['qps1000_cpu'])} ({_ratio(bw['qps1000'], hbw and hbw['qps1000'])} wall)",
        f"{_ratio(b['qps1000_cpu'], best_f)} ({_ratio(bw['qps1000'], best_fw)} wall)",
        f"{lat_s} vs {hl['latency_cpu_ms']:.3f}" if hl else "–",
        f"{r['build_cpu_s'] / hn['build_cpu_s']:.3f} ({r['build_s'] / hn['build_s']:.3f} wall)"
        if hn
        else "–",
        f"{_peak_rss(r):.0f} vs {_peak_rss(hn):.0f}" if hn else "–",
    ]


def section(kind: str, n: int, dim: int, results: List[Dict], note: str) -> str:

    lines = [f"## {kind}: {n:,} x {dim}", "", note, ""]
    results = [dict(r, peer=r["peer"] + " *") if r.get("remeasured") else r for r in results]
    lines += [_search_table(results), ""]
    lines += [_build_table(results), ""]
    auto = [r for r in results if r["knob"] == "tune"]
    lean = [r for r in results if r["peer"].startswith("leanclip") and r["knob"] != "tune"]
    by = {r["peer"]: r for r in results}
    hn = by.get("hnswlib HNSW")
    faiss_ivf = [r for r in results if r["peer"] in ("faiss IVFFlat", "faiss IVF-SQ8")]
    trows = [_target_row(r, target, hn, faiss_ivf) for target in (0.95, 0.99) for r in lean]
    if auto:
        lines.extend(auto_section(auto, by.get("hnswlib HNSW")))
    if not lean:  # only the tuned peers: their table above is the result
        return "\n".join(lines) + "\n"
    lines.append("Targets (ratios from this run; CPU time first, wall clock in parentheses):")
    lines.append("")
    lines.append(
        markdown_table(
            [
                "leanclip",
                "recall >=",
                "best Q=1000 (queries per CPU-s)",
                "at recall exactly R (interpolated): Q=1000 vs hnswlib; Q=1 CPU ms",
                "vs hnswlib (target >= 2x)",
                "vs best faiss IVF (target >= 1.2x)",
                "Q=1 CPU ms vs hnswlib (target <=)",
                "build / hnswlib build (target <= 0.1)",
                "peak RSS MiB (build + searches) vs hnswlib (target <=)",
            ],
            trows,
        )
    )
    return "\n".join(lines) + "\n"


def auto_section(auto: List[Dict], hn: Optional[Dict]) -> List[str]:
    """Defaults + tune: per target, what tune expected, what the held-out queries got, and
    hnswlib at the same recall (its Pareto curve interpolated there)."""
    rows = []
    for r in auto:
        for p in r["points"]:
            t = p.get("tune", {})
            single = p["single"][0]
            if p["setting"] == "defaults":
                rows.append(
                    [
                        r["peer"],
                        "defaults (untuned)",
                        "",
                        p["recall"],
                        single["recall"],
                        "",
                        "",
                        f"{p['qps1000_cpu']:,.0f}",
                        "",
                        f"{single['latency_cpu_ms']:.3f}",
                        "",
                        "",
                        "",
                    ]
                )
                continue
            target = float(p["setting"])
            hq = hn and at_recall(hn, p["recall"], "qps1000_cpu")
            hl = hn and at_recall(hn, single["recall"], "latency_cpu_ms")
            batch_r, single_r = _landing(p)
            ok = abs(batch_r - target) <= 0.01 and abs(single_r - target) <= 0.01
            land = p.get("landing")
            rows.append(
                [
                    r["peer"],
                    target,
                    f"{t.get('recall', float('nan')):.4f} ± {t.get('spread', float('nan')):.4f} / "
                    f"{t.get('recall_single', float('nan')):.4f} ± {t.get('spread_single', float('nan')):.4f}",
                    p["recall"],
                    single["recall"],
                    f"{land['recall']:.4f} ± {land['spread']:.4f} / "
                    f"{land['recall_single']:.4f} ± {land['spread_single']:.4f}"
                    if land
                    else "–",
                    "yes" if ok else "NO",
                    f"{p['qps1000_cpu']:,.0f}",
                    _ratio(p["qps1000_cpu"], hq),
                    f"{single['latency_cpu_ms']:.3f}",
                    f"{hl / single['latency_cpu_ms']:.2f}x" if hl else "–",
                    f"nprobe={t.get('nprobe')}, nprobe_single={t.get('nprobe_single')}, "
                    f"shortlist={t.get('shortlist')}, scan_dims={t.get('scan_dims')}"
                    + (f", single_scan={t['single_scan']}" if "single_scan" in t else ""),
                    f"{t.get('cpu_seconds', float('nan')):.2f} ({100 * t.get('cpu_seconds', float('nan')) / r['build_cpu_s']:.1f}%)",
                ]
            )
    chosen = [f"{r['peer']}: `{p.get('tune', {}).get('repr', '')}`" for r in auto for p in r["points"][:1]]
    return [
        'Defaults + tune (no per-data-set settings): `IVFIndex(dim, "ip")`, trained on the build, '
        "then `tune(target)` for each target; timed and measured on the 1,000 held-out queries "
        "(hnswlib's queries per CPU-s and CPU ms are its Pareto curves interpolated to the recall "
        "leanclip reached there: same recall, log-linear between ef settings); whether tune landed "
        "within ±0.01 is judged on all the held-out queries (5,000, the 1,000 timed among them), "
        "batch and single.",
        "",
        "Chosen at defaults:",
        "",
        *(f"- {c}" for c in chosen),
        "",
        H_table(
            [
                "leanclip",
                "target",
                "tune expected: batch / single (± 1.96 SE)",
                "held-out recall (1,000 timed): Q=1000",
                "Q=1",
                "landing, all held-out: batch / single (± 1.96 SE)",
                "within ±0.01",
                "Q=1000 queries per CPU-s",
                "vs hnswlib at that recall (target >= 2x)",
                "Q=1 CPU ms",
                "Q=1 vs hnswlib at that recall (speed-up)",
                "settings tune chose",
                "tune CPU-s (of build)",
            ],
            rows,
        ),
        "",
    ]


def H_table(header: List[str], rows: List[List]) -> str:

    return markdown_table(header, rows)


def plot(all_results: Dict[str, List[Dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(all_results)
    fig, axes = plt.subplots(2, len(kinds), figsize=(6.5 * len(kinds), 10), squeeze=False)
    panels = [
        ("qps1000_cpu", "queries per CPU-second, batch of 1000"),
        ("latency_cpu_ms", "queries per CPU-second, one at a time"),
    ]
    for col, kind in enumerate(kinds):
        for row, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for r in all_results[kind]:
                if r["knob"] == "tune":  # a few tuned points, not a sweep
                    pts = sorted(
                        (
                            p
                            for p in points_for(r, key)
                            if p["setting"] != "defaults" and not str(p["setting"]).startswith("defaults")
                        ),
                        key=lambda p: p["recall"],
                    )
                    x = [p["recall"] for p in pts]
                    y = [p[key] if key.startswith("qps") else 1000.0 / p[key] for p in pts]
                    ax.plot(x, y, "*", label=r["peer"], markersize=12)
                    continue
                pts = pareto(points_for(r, key), key)
                x = [p["recall"] for p in pts]
                y = [p[key] if key.startswith("qps") else 1000.0 / p[key] for p in pts]
                style = "-o" if r["peer"].startswith("leanclip") else "--s"
                ax.plot(x, y, style, label=r["peer"], markersize=4, linewidth=2 if style == "-o" else 1.2)
            ax.set_yscale("log")
            ax.set_xlabel("recall@10")
            ax.set_ylabel(label)
            ax.set_title(f"{kind} ({all_results[kind][0]['n']:,} vectors)")
            ax.axvline(0.95, color="grey", linewidth=0.6, linestyle=":")
            ax.axvline(0.99, color="grey", linewidth=0.6, linestyle=":")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Recall vs throughput per CPU-second (up and right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def merge_results(paths: Sequence[str]) -> Dict[str, List[Dict]]:
    """Result files merged in order: per data set, a later file's row of a peer replaces an
    earlier file's row of that peer, the other peers' rows are kept (re-run leanclip, keep
    hnswlib); a data set whose size differs in a later file is replaced whole."""
    merged: Dict[str, Dict[str, Dict]] = {}
    for f in paths:
        for kind, rows in json.loads(Path(f).read_text()).items():
            if any(r["n"] != rows[0]["n"] for r in merged.get(kind, {}).values()):
                merged[kind] = {}
            merged.setdefault(kind, {}).update({r["peer"]: r for r in rows})
    return {kind: list(rows.values()) for kind, rows in merged.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--data-path")
    ap.add_argument("--add-fraction", type=float, default=0.01)
    ap.add_argument("--data", action="append", help="kind:n, e.g. clustered:200000 (repeatable)")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--json", default=str(CACHE / "ivf-results.json"))
    ap.add_argument("--load-note", default="")
    ap.add_argument(
        "--report",
        nargs="+",
        help="only rewrite ivf.md / ivf.png from these result JSON files (a later file's peer rows replace earlier ones)",
    )
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data_path, args.add_fraction)))
        return
    if args.report:
        report(merge_results(args.report), None, os.getloadavg(), args.load_note)
        return
    specs = args.data or ["clustered:100000"]
    all_results: Dict[str, List[Dict]] = {}
    load_before = os.getloadavg()
    for spec in specs:
        kind, n = spec.split(":")
        if n == "auto":  # minilm: every embedding cached so far, less the held-out and tune queries
            from benchmarks.data.minilm_embeddings import load

            n = str((len(load(10**9)) - LANDING - Q) // 1000 * 1000)
        path = make_data(kind, int(n))
        print(f"{kind} {n}: {path}", file=sys.stderr)
        results = [r for r in (run_peer(p, path, args.add_fraction) for p in args.peers.split(",")) if r]
        all_results[kind] = results
        Path(args.json).write_text(json.dumps(all_results, indent=1))
    report(all_results, load_before, os.getloadavg(), args.load_note)


def report(all_results: Dict[str, List[Dict]], load_before, load_after, extra: str) -> None:
    from benchmarks import _harness as H

    sections = []
    for kind, results in all_results.items():
        n = results[0]["n"]
        dim = int(np.load(CACHE / f"{kind}-{n}-seed0.npz")["base"].shape[1])
        note = (
            f"nlist = {nlist_for(n)} for every IVF; HNSW M={M}, efConstruction={EF_CONSTRUCTION}; "
            f"{THREADS} threads everywhere; k={K}. Build = the first 99% of the vectors "
            "(IVF: training + adding); the last 1% is then added to the built index."
        )
        sections.append(section(kind, n, dim, results, note))
    png = H.RESULTS / "ivf.png"
    plot(all_results, png)
    start = (
        f"at start {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, " if load_before else ""
    )
    note = (
        f"Load average (1/5/15 min) {start}at end {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} "
        f"on {os.cpu_count()} cores (other jobs were running: absolute numbers are low and noisy, "
        f"ratios in one run are what counts). Plot: [ivf.png](ivf.png). {extra}"
    )
    text = H.header(
        "IVF index: leanclip.IVFIndex vs hnswlib, usearch, faiss", ["hnswlib", "usearch", "faiss-cpu"], note
    )
    H.write_result("ivf", text + "\n" + targets_section(all_results) + "\n" + "\n".join(sections))


if __name__ == "__main__":
    main()
