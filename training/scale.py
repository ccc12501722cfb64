"""Corpus-scale work on torch.distributed (torchrun; gloo on CPUs, NCCL on GPUs): hard-negative
mining over a corpus sharded across ranks, batch search where each rank holds some index
shards, and IVF building from embedding files on many ranks (docs/scale.md).

    torchrun --nproc_per_node 4 -m training.scale mine --queries img.npy --corpus txt.npy \\
        --query-groups img_ids.npy --corpus-groups cap_img_ids.npy --k 10 --out mined/
    torchrun --nproc_per_node 4 -m training.scale build-ivf ivf/ emb/ --nlist 4096 --pq 32
    torchrun --nproc_per_node 4 -m training.scale search ivf/ --queries q.npy --k 10 --out hits.npz

**Mining layouts.** ``corpus`` (the default): rank r holds corpus rows ``[r*N/W, (r+1)*N/W)``
(zero-copy from an mmap'd ``.npy`` when they sit in one file) and 1/W of the queries. Query
blocks travel around the ring of ranks with their running top k; at each hop a rank mines the
block against its rows with the engine (group exclusion, low-precision scan and exact re-score
as in one process) and merges exactly, best score first, equal scores by ascending row. After W
hops a block is back at its owner with its global top k. Only queries and k candidates per query
travel, never scores against the corpus. Per-rank memory: corpus / W + a few query blocks.
``query``: every rank holds the whole corpus and mines its 1/W of the queries: no communication,
corpus-sized memory per rank; the better choice when the corpus fits each machine and the
queries are many. Both give the rows and scores of one process's ``mine_hard_negatives``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from training.distributed import DistInfo, all_counts, barrier, init_distributed

LAYOUTS = ("corpus", "query")


def share(n: int, rank: int, world_size: int) -> slice:
    """Rows ``[rank*n/W, (rank+1)*n/W)``: contiguous, sizes differ by at most one."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


class NpyRows:
    """Rows of one or more ``.npy`` files ((n_i, dim), read as one (sum n_i, dim) array), read
    on demand: each slice maps the files afresh, so rows read once do not stay resident."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        from leanclip.shards import EmbeddingShards

        self.files = EmbeddingShards([Path(p) for p in paths])
        self.shape = (self.files.total, self.files.dim)
        self.dtype = self.files.open(self.files.paths[0]).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int, copy: bool = True) -> np.ndarray:
        """Rows [start, stop). ``copy=False`` returns the mmap'd slice itself when the rows sit
        in one file (no copy; its pages count as resident once read). Copies are read with
        plain file reads into one array: no mapped pages stay behind, so the copy is the only
        memory they take."""
        f = self.files
        parts = [
            (i, max(start, int(f.offsets[i])), min(stop, int(f.offsets[i + 1])))
            for i in range(len(f.paths))
            if max(start, f.offsets[i]) < min(stop, f.offsets[i + 1])
        ]
        if len(parts) == 1 and not copy:
            i, lo, hi = parts[0]
            return f.open(f.paths[i])[lo - f.offsets[i] : hi - f.offsets[i]]
        out = np.empty((max(0, stop - start), self.shape[1]), self.dtype)
        for i, lo, hi in parts:
            _read_rows(f.paths[i], lo - int(f.offsets[i]), out[lo - start : hi - start])
        return out

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(len(self))
        return self.rows(start, stop)


# The engine scores fewer queries than this per call with its per-row kernels and more with
# matrix products (rust/engine/src/search.rs, GEMM_MIN_QUERIES): the two round differently in
# the last bit. One process scores a batch of >= 8 queries with products, so a block smaller
# than that is padded (with copies of its first query) to score exactly like it.
GEMM_MIN_QUERIES = 8


def _pad_block(q: np.ndarray, total: int, *extra: np.ndarray) -> list[np.ndarray]:
    """``q`` (and ``extra`` per-query arrays) padded to GEMM_MIN_QUERIES rows when the whole
    query set reaches it (see GEMM_MIN_QUERIES)."""
    short = GEMM_MIN_QUERIES - len(q)
    if short <= 0 or total < GEMM_MIN_QUERIES or not len(q):
        return [q, *extra]
    return [np.concatenate([a, np.repeat(a[:1], short, axis=0)]) for a in (q, *extra)]


def _read_rows(path: Path, first: int, out: np.ndarray) -> None:
    """Fill ``out`` with rows ``first ..`` of a C-order ``.npy`` file, by file reads."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        _, fortran, _ = read_header(fh)
        if fortran:
            raise ValueError(f"{path}: a Fortran-order array; save it in C order")
        fh.seek(fh.tell() + first * out.shape[1] * out.itemsize)
        if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise ValueError(f"{path}: shorter than its header says")


# A rank's rows go to the engine in this many calls at least when it copies them (a low-precision
# scan packs an i8 / bf16 copy, dtype f16 / i8 encodes one): that copy is then 1/16 of the rows',
# not all of them on top of their f32 pages (it took i8 mining past its memory budget of 1.2 x the
# rank's corpus bytes; benchmarks/results/scale.md). Calls of fewer than SCAN_MIN_ROWS rows would
# only add per-call work.
SCAN_SPLIT, SCAN_MIN_ROWS = 16, 4096


def _scan_rows(n: int, dtype: str, precision: str) -> int:
    """Corpus rows per engine call for a rank holding ``n`` rows: all of them where the engine
    reads them as they are (f32 scan of f32 rows), else 1/SCAN_SPLIT of them (at least
    SCAN_MIN_ROWS)."""
    if dtype == "f32" and precision == "f32":
        return max(1, n)
    return max(SCAN_MIN_ROWS, -(-n // SCAN_SPLIT))


def _worst(metric: str) -> float:
    return float("inf") if metric == "l2" else float("-inf")


def _merge(
    rows: np.ndarray, scores: np.ndarray, more_rows: np.ndarray, more_scores: np.ndarray, k: int, metric: str
) -> Tuple[np.ndarray, np.ndarray]:
    """The best k of two candidate lists per query (disjoint rows): best score first, equal
    scores by ascending row, -1 (no row) last."""
    r = np.concatenate([rows, more_rows], axis=1)
    s = np.concatenate([scores, more_scores], axis=1)
    rank = s if metric == "l2" else -s
    rank = np.where(r < 0, np.inf, rank)
    order = np.lexsort((np.where(r < 0, np.iinfo(np.int64).max, r), rank), axis=-1)[:, :k]
    return np.take_along_axis(r, order, 1), np.take_along_axis(s, order, 1)


def _exchange(
    info: DistInfo, tensors: list[torch.Tensor], shapes: list[tuple[int, ...]]
) -> list[torch.Tensor]:
    """Send ``tensors`` to the next rank of the ring and receive tensors of ``shapes`` (same
    dtypes) from the previous one."""
    nxt, prev = (info.rank + 1) % info.world_size, (info.rank - 1) % info.world_size
    received = [torch.empty(shape, dtype=t.dtype, device=info.device) for t, shape in zip(tensors, shapes)]
    ops = [dist.P2POp(dist.isend, t.to(info.device).contiguous(), nxt) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, prev) for t in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return [t.cpu() for t in received]


def mine_corpus_sharded(
    queries: Any,
    corpus: np.ndarray,
    corpus_start: int,
    k: int,
    info: DistInfo,
    query_groups: Optional[np.ndarray] = None,
    corpus_groups: Optional[np.ndarray] = None,
    *,
    metric: str = "ip",
    dtype: str = "f32",
    precision: str = "f32",
    block: int = 4096,
    scan_rows: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Hard negatives of this rank's ``queries`` against the corpus held across all ranks.

    ``corpus``: this rank's rows, which are global rows ``corpus_start + j`` (any array the
    engine reads, e.g. an mmap'd ``.npy`` slice); ``queries``: this rank's queries (an array or
    ``NpyRows``, read ``block`` rows at a time). Groups as ``mine_hard_negatives`` (both or
    neither). Returns (q_local, k) global corpus rows and their scores, exactly those of one
    process's ``mine_hard_negatives`` over the whole corpus (-1 / -inf where fewer than k rows
    are eligible). Every rank must call it (collectives).

    ``scan_rows``: corpus rows per engine call (default ``_scan_rows``). Each call's top k are
    merged exactly as the ring merges, so any value gives the same result; it bounds the copy
    the engine makes of the rows it scans (see ``_scan_rows``)."""
    from leanclip import mine_hard_negatives

    if (query_groups is None) != (corpus_groups is None):
        raise ValueError("give both query_groups and corpus_groups, or neither")
    grouped = query_groups is not None
    q_local, n_local = len(queries), len(corpus)
    dim = int(corpus.shape[1])
    counts = all_counts([-(-q_local // block), q_local], info)
    rounds, q_total = max(c[0] for c in counts), sum(c[1] for c in counts)
    out_rows = np.full((q_local, k), -1, np.int64)
    out_scores = np.full((q_local, k), _worst(metric), np.float32)
    qdtype = torch.from_numpy(np.zeros(0, corpus.dtype)).dtype
    step = max(1, scan_rows or _scan_rows(n_local, dtype, precision))
    for j in range(rounds):
        lo, hi = min(q_local, j * block), min(q_local, (j + 1) * block)
        q = np.ascontiguousarray(queries[lo:hi], dtype=corpus.dtype)
        g = np.ascontiguousarray(query_groups[lo:hi], np.int64) if grouped else np.zeros(hi - lo, np.int64)  # type: ignore[index]
        rows = np.full((hi - lo, k), -1, np.int64)
        scores = np.full((hi - lo, k), _worst(metric), np.float32)
        for _hop in range(info.world_size):
            qp, gp = _pad_block(q, q_total, g)
            for c_lo in range(0, n_local if len(q) else 0, step):
                c_hi = min(n_local, c_lo + step)
                r, s = mine_hard_negatives(
                    qp,
                    corpus[c_lo:c_hi],
                    min(k, c_hi - c_lo),
                    query_groups=gp if grouped else None,
                    corpus_groups=None if corpus_groups is None else corpus_groups[c_lo:c_hi],
                    metric=metric,  # type: ignore[arg-type]
                    dtype=dtype,  # type: ignore[arg-type]
                    precision=precision,  # type: ignore[arg-type]
                )
                r = np.where(r[: len(q)] >= 0, r[: len(q)] + corpus_start + c_lo, -1)
                rows, scores = _merge(rows, scores, r, s[: len(q)], k, metric)
            if info.world_size > 1:  # pass the block on; after W hops it is home again
                m = int(all_counts([len(q)], info)[(info.rank - 1) % info.world_size][0])
                got = _exchange(
                    info,
                    [
                        torch.from_numpy(q),
                        torch.from_numpy(g),
                        torch.from_numpy(rows),
                        torch.from_numpy(scores),
                    ],
                    [(m, dim), (m,), (m, k), (m, k)],
                )
                assert got[0].dtype == qdtype
                q, g, rows, scores = (t.numpy() for t in got)
        out_rows[lo:hi], out_scores[lo:hi] = rows, scores
    return out_rows, out_scores


def mine_query_sharded(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    query_groups: Optional[np.ndarray] = None,
    corpus_groups: Optional[np.ndarray] = None,
    **engine: Any,
) -> Tuple[np.ndarray, np.ndarray]:
    """This rank's queries against the whole corpus (every rank holds it): the query-sharded
    layout, one engine call, no communication."""
    from leanclip import mine_hard_negatives

    return mine_hard_negatives(
        queries, corpus, k, query_groups=query_groups, corpus_groups=corpus_groups, **engine
    )


def mine(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    info: DistInfo,
    query_groups: Optional[np.ndarray] = None,
    corpus_groups: Optional[np.ndarray] = None,
    *,
    layout: str = "corpus",
    **engine: Any,
) -> Tuple[np.ndarray, np.ndarray]:
    """Mining over in-memory arrays every rank holds (the training loop's case): this rank's
    share of the work in ``layout``, then every rank gets all (q, k) rows and scores, equal to
    one process's ``mine_hard_negatives``."""

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    qs = share(len(queries), info.rank, info.world_size)
    qg = None if query_groups is None else query_groups[qs]
    if layout == "query":
        rows, scores = _mine_block(queries[qs], qg, corpus, corpus_groups, k, len(queries), engine)
        if rows.shape[1] < k:  # fewer corpus rows than k
            pad = ((0, 0), (0, k - rows.shape[1]))
            rows = np.pad(rows, pad, constant_values=-1)
            scores = np.pad(scores, pad, constant_values=_worst(engine.get("metric", "ip")))
    else:
        cs = share(len(corpus), info.rank, info.world_size)
        cg = None if corpus_groups is None else corpus_groups[cs]
        rows, scores = mine_corpus_sharded(queries[qs], corpus[cs], cs.start, k, info, qg, cg, **engine)
    # gather_rows' shares are shard_for_rank's (ceil-sized); ours are floor-sized: gather by size
    return _gather_shares(rows, len(queries), info), _gather_shares(scores, len(queries), info)


def _gather_shares(local: np.ndarray, n: int, info: DistInfo) -> np.ndarray:
    from training.distributed import gather_no_grad

    if not info.enabled:
        return local
    sizes = [
        share(n, r, info.world_size).stop - share(n, r, info.world_size).start for r in range(info.world_size)
    ]
    return gather_no_grad(torch.from_numpy(np.ascontiguousarray(local)).to(info.device), sizes).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Search where each rank holds some shards


def search_distributed(
    index: Any, queries: np.ndarray, k: int, info: DistInfo, block: int = 8192
) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k of ``queries`` (the same on every rank) over the union of every rank's ``index``
    (an ``Index``, ``IVFIndex`` or ``ShardedIndex`` of this rank's shards; keys disjoint across
    ranks): each rank searches its shards, k per query is gathered and merged exactly. Every
    rank gets the (q, k') keys and scores."""
    from leanclip.shards import drop_padding, merge_topk, search_rows

    lowest_first = str(index.metric) == "l2"
    keys_out, scores_out = [], []
    for lo in range(0, len(queries), block):
        q = np.ascontiguousarray(queries[lo : lo + block], np.float32)
        keys, scores = (a[: len(q)] for a in search_rows(index, _pad_block(q, len(queries))[0], k))
        if info.enabled:
            kt = torch.from_numpy(keys.view(np.int64)).to(info.device)
            st = torch.from_numpy(scores).to(info.device)
            all_k = [torch.empty_like(kt) for _ in range(info.world_size)]
            all_s = [torch.empty_like(st) for _ in range(info.world_size)]
            dist.all_gather(all_k, kt)
            dist.all_gather(all_s, st)
            keys, scores = merge_topk(
                [t.cpu().numpy().view(np.uint64) for t in all_k],
                [t.cpu().numpy() for t in all_s],
                k,
                lowest_first,
            )
        keys_out.append(keys)
        scores_out.append(scores)
    return drop_padding(np.concatenate(keys_out), np.concatenate(scores_out))


# --------------------------------------------------------------------------------------------
# The command line


def _cmd_mine(args: argparse.Namespace, info: DistInfo) -> dict[str, Any]:
    queries, corpus = NpyRows(args.queries), NpyRows(args.corpus)
    qs = share(len(queries), info.rank, info.world_size)
    qg = np.load(args.query_groups, mmap_mode="r") if args.query_groups else None
    cg = np.load(args.corpus_groups, mmap_mode="r") if args.corpus_groups else None
    engine = {"metric": args.metric, "dtype": args.dtype, "precision": args.precision}
    local_q = _QueryView(queries, qs)
    if args.layout == "corpus":
        cs = share(len(corpus), info.rank, info.world_size)
        local_c = corpus.rows(cs.start, cs.stop, copy=False)
        rows, scores = mine_corpus_sharded(
            local_q,
            local_c,
            cs.start,
            args.k,
            info,
            None if qg is None else np.asarray(qg[qs]),
            None if cg is None else np.ascontiguousarray(cg[cs], np.int64),
            block=args.block,
            scan_rows=args.scan_rows,
            **engine,
        )
    else:
        whole = corpus.rows(0, len(corpus), copy=False)
        parts = [
            _mine_block(
                local_q[lo : lo + args.block],
                None if qg is None else np.asarray(qg[qs][lo : lo + args.block]),
                whole,
                None if cg is None else np.ascontiguousarray(cg, np.int64),
                args.k,
                len(queries),
                engine,
            )
            for lo in range(0, len(local_q), args.block)
        ]
        rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, args.k), np.int64)
        scores = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, args.k), np.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"part-{info.rank:05d}.npz", query_start=qs.start, rows=rows, scores=scores)
    return {"queries": len(queries), "corpus": len(corpus), "parts": info.world_size, "out": str(out)}


def _mine_block(
    q: np.ndarray,
    qg: Optional[np.ndarray],
    corpus: np.ndarray,
    cg: Optional[np.ndarray],
    k: int,
    total: int,
    engine: dict[str, Any],
) -> Tuple[np.ndarray, np.ndarray]:
    """One block of the query-sharded layout, scored as one process scores it."""
    q = np.ascontiguousarray(q, corpus.dtype)
    g = np.zeros(len(q), np.int64) if qg is None else np.ascontiguousarray(qg, np.int64)
    qp, gp = _pad_block(q, total, g)
    rows, scores = mine_query_sharded(qp, corpus, k, None if qg is None else gp, cg, **engine)
    return rows[: len(q)], scores[: len(q)]


class _QueryView:
    """Rows ``s`` of an ``NpyRows``, sliced relative to ``s.start``."""

    def __init__(self, rows: NpyRows, s: slice) -> None:
        self.src, self.s = rows, s

    def __len__(self) -> int:
        return self.s.stop - self.s.start

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(len(self))
        return self.src.rows(self.s.start + start, self.s.start + stop)


def _cmd_build_ivf(args: argparse.Namespace, info: DistInfo) -> dict[str, Any]:
    from leanclip.shards import EmbeddingShards, build_ivf, embedding_files

    return build_ivf(
        EmbeddingShards(embedding_files(args.embeddings)),
        args.out,
        nlist=args.nlist,
        metric=args.metric,
        dtype=args.dtype,
        pq=args.pq,
        rerank=args.rerank,
        scan_dims=args.scan_dims,
        seed=args.seed,
        sample=args.sample,
        chunk=args.chunk,
        rank=info.rank,
        world_size=info.world_size,
        barrier=barrier,
    )


def _cmd_search(args: argparse.Namespace, info: DistInfo) -> dict[str, Any]:
    from leanclip.shards import ShardedIndex

    local = ShardedIndex.load(args.index, mmap=True, part=(info.rank, info.world_size))
    if args.nprobe:
        local.nprobe = args.nprobe
    queries = np.load(args.queries, mmap_mode="r")
    keys, scores = search_distributed(local, queries, args.k, info)
    if info.is_main:
        np.savez(args.out, keys=keys, scores=scores)
    return {"queries": len(queries), "k": int(keys.shape[1]), "out": args.out}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.scale", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mine", help="hard negatives, corpus sharded over the ranks (or queries)")
    m.add_argument("--queries", nargs="+", required=True, help=".npy query embeddings (files in order)")
    m.add_argument("--corpus", nargs="+", required=True, help=".npy corpus embeddings (files in order)")
    m.add_argument("--query-groups", help=".npy int64 group per query (with --corpus-groups)")
    m.add_argument("--corpus-groups", help=".npy int64 group per corpus row")
    m.add_argument("--k", type=_positive, default=10)
    m.add_argument("--layout", choices=LAYOUTS, default="corpus")
    m.add_argument("--metric", default="ip", choices=("ip", "cos", "l2"))
    m.add_argument("--dtype", default="f32", choices=("f32", "f16", "i8"))
    m.add_argument("--precision", default="f32", choices=("f32", "bf16", "i8"))
    m.add_argument("--block", type=_positive, default=4096, help="queries per travelling block")
    m.add_argument(
        "--scan-rows",
        type=_positive,
        default=None,
        help="corpus rows per engine call (corpus layout; default: a rank's rows / 16, at least 4096, "
        "where the engine copies them for a low-precision scan or another dtype)",
    )
    m.add_argument("--out", required=True, help="folder for part-RANK.npz (query_start, rows, scores)")
    b = sub.add_parser("build-ivf", help="IVF shard files from embedding files, files split over ranks")
    b.add_argument("out")
    b.add_argument("embeddings", nargs="+")
    b.add_argument("--nlist", type=int, default=1024)
    b.add_argument("--metric", default="ip", choices=("ip", "cos", "l2"))
    b.add_argument("--dtype", default="f16", choices=("f32", "f16", "i8"))
    b.add_argument("--pq", type=int, default=0)
    b.add_argument("--rerank", type=int, default=0)
    b.add_argument("--scan-dims", type=int, default=0, help="principal directions batches rank by (0: all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sample", type=int, default=None)
    b.add_argument("--chunk", type=_positive, default=65536)
    s = sub.add_parser("search", help="batch search; each rank holds every W-th shard of a manifest")
    s.add_argument("index", help="a shard manifest (or its folder)")
    s.add_argument("--queries", required=True, help=".npy queries (every rank reads them)")
    s.add_argument("--k", type=_positive, default=10)
    s.add_argument("--nprobe", type=int, default=0)
    s.add_argument("--out", required=True, help=".npz of keys and scores (written by rank 0)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL); the engine runs on the CPU")
    return p


def _rss_kib(field: str) -> int:
    """VmRSS / VmHWM (peak) of this process in KiB (0 where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import time

    from leanclip.errors import LeanclipError

    args = parser().parse_args(argv)
    try:
        info = init_distributed(args.device)
        run = {"mine": _cmd_mine, "build-ivf": _cmd_build_ivf, "search": _cmd_search}[args.command]
        start_kib, started = _rss_kib("VmRSS"), time.perf_counter()
        summary = run(args, info)
        # every rank's time and memory (peak RSS, and RSS before the command: the imports)
        ms = int(1000 * (time.perf_counter() - started))
        ranks = all_counts([ms, start_kib, _rss_kib("VmHWM")], info)
    except (LeanclipError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if info.is_main:
        summary["ranks"] = [
            {"seconds": m / 1000, "start_rss_mib": a / 1024, "peak_rss_mib": p / 1024} for m, a, p in ranks
        ]
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
