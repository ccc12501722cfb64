"""Index shards: several index files searched as one, and IVF indexes built from sharded
embedding files without holding all the vectors in memory (docs/scale.md).

- :class:`ShardedIndex` holds several ``Index`` or ``IVFIndex`` objects (or a manifest of their
  files) whose keys are disjoint, and answers ``search`` like one index: each shard's top k,
  searched in parallel threads (the engine releases the GIL), merged exactly (best score first,
  equal scores by ascending key, as ``Index.search``). Over exact shards the result equals one
  ``Index`` holding every row; over IVF shards that share one trained quantizer, at
  ``nprobe = nlist`` it equals one exact index too.
- :func:`build_ivf` builds such IVF shards from embedding files (``.npy``, float32 or float16,
  read through mmap): k-means centroids (and PQ codebooks when ``pq > 0``, principal directions
  when ``scan_dims > 0``) are trained once on a seeded sample drawn across all the files and
  saved as ``quantizer.ivf``; every embedding file
  then becomes one IVF file holding the same quantizer and that file's rows (added in chunks),
  and ``manifest.json`` lists them. Peak memory is one embedding file's index, not the corpus.
  ``rank`` / ``world_size`` split the files over processes (``training.scale`` runs it under
  torch.distributed); the result is the same files for any world size.

The command line: ``python -m leanclip.build_ivf OUT EMB.npy [EMB.npy ...] --nlist 4096``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import numpy as np

from leanclip._fs import PathLike
from leanclip.errors import IndexFileError, LeanclipError

__all__ = [
    "MANIFEST",
    "EmbeddingShards",
    "ShardError",
    "ShardedIndex",
    "build_exact",
    "build_ivf",
    "drop_padding",
    "embedding_files",
    "merge_topk",
    "search_rows",
]

MANIFEST = "manifest.json"
FORMAT = "leanclip-shards"
QUANTIZER = "quantizer.ivf"


class ShardError(LeanclipError, ValueError):
    """Bad shard inputs: unreadable or mismatched embedding files, shards that do not fit
    together, a malformed manifest (named in the message)."""


# --------------------------------------------------------------------------------------------
# Merging per-shard top-k lists


def merge_topk(
    keys: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int, lowest_first: bool = False
) -> Tuple[np.ndarray, np.ndarray]:
    """Merge (q, k_i) top-k lists of disjoint key sets into the (q, min(k, sum k_i)) best:
    best score first (lowest for "l2"), equal scores by ascending key, NaN scores last. Exact:
    the best k of the union are among the union of each part's best k."""
    all_keys = np.concatenate([np.asarray(x) for x in keys], axis=1)
    all_scores = np.concatenate([np.asarray(x, np.float32) for x in scores], axis=1)
    take = min(k, all_keys.shape[1])
    rank = all_scores if lowest_first else -all_scores  # NaN sorts last either way
    order = np.lexsort((all_keys, rank), axis=-1)[:, :take]
    return np.take_along_axis(all_keys, order, 1), np.take_along_axis(all_scores, order, 1)


# --------------------------------------------------------------------------------------------
# Searching shards as one index


def _load_manifest(path: Path) -> Tuple[Path, dict[str, Any]]:
    manifest = path / MANIFEST if path.is_dir() else path
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise IndexFileError(f"{manifest}: no shard manifest there") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"{manifest}: not a readable shard manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IndexFileError(f"{manifest}: not a leanclip shard manifest (format != {FORMAT!r})")
    shards = data.get("shards")
    if data.get("kind") not in ("exact", "ivf") or not isinstance(shards, list) or not shards:
        raise IndexFileError(f"{manifest}: the manifest needs a kind (exact/ivf) and a list of shards")
    for s in shards:
        if (
            not isinstance(s, dict)
            or not isinstance(s.get("file"), str)
            or "/" in s["file"]
            or s["file"] in ("", ".", "..")
        ):
            raise IndexFileError(f"{manifest}: bad shard entry {s!r} (a file name in the manifest's folder)")
    return manifest.parent, data


class ShardedIndex:
    """Several indexes with disjoint keys, searched as one (same ``search`` as ``Index``).

    ``shards``: ``Index`` / ``IVFIndex`` objects of one dim and metric. ``threads``: shards
    searched at once (default: all of them; each search also uses the engine's own threads)."""

    def __init__(self, shards: Sequence[Any], threads: Optional[int] = None) -> None:
        shards = list(shards)
        if not shards:
            raise ShardError("a ShardedIndex needs at least one shard")
        self._init(shards, threads)

    def _init(self, shards: list[Any], threads: Optional[int]) -> None:
        dims = {int(s.dim) for s in shards}
        metrics = {str(s.metric) for s in shards}
        if len(dims) != 1 or len(metrics) != 1:
            raise ShardError(f"shards disagree: dims {sorted(dims)}, metrics {sorted(metrics)}")
        if threads is not None and threads < 1:
            raise ShardError(f"threads must be >= 1, got {threads}")
        self.shards = shards
        self.threads = max(1, min(len(shards), threads or len(shards)))

    @staticmethod
    def load(
        path: PathLike,
        mmap: bool = False,
        verify: bool = True,
        threads: Optional[int] = None,
        part: Optional[Tuple[int, int]] = None,
    ) -> "ShardedIndex":
        """Open the shards a manifest lists (``path``: the manifest or its folder), each with
        ``Index.load`` / ``IVFIndex.load(..., mmap, verify)``. ``part=(r, W)`` opens only
        shards r, r + W, r + 2W, ... (one process's part of a distributed search; an empty
        part is an empty index of the manifest's dim and metric)."""
        from leanclip._engine import Index, IVFIndex

        folder, data = _load_manifest(Path(path))
        cls = IVFIndex if data["kind"] == "ivf" else Index
        entries = data["shards"] if part is None else data["shards"][part[0] :: part[1]]
        shards = [cls.load(folder / s["file"], mmap=mmap, verify=verify) for s in entries]
        if not shards:
            shards = [Index(int(data.get("dim", 1)), metric=data.get("metric", "ip"))]
        return ShardedIndex(shards, threads)

    @property
    def dim(self) -> int:
        return int(self.shards[0].dim)

    @property
    def metric(self) -> str:
        return str(self.shards[0].metric)

    @property
    def nprobe(self) -> int:
        """Lists each IVF shard scans per query (settable: sets every shard's)."""
        return int(self.shards[0].nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        for s in self.shards:
            if hasattr(s, "nprobe"):
                s.nprobe = value

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __contains__(self, key: object) -> bool:
        return any(key in s for s in self.shards)

    def search(self, queries: Any, k: int = 10, exclude: Any = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k over every shard, shaped like ``Index.search``: (dim,) -> 1-D results,
        (q, dim) -> (q, k') with k' = min(k, len(self) - excluded keys present)."""
        from leanclip._validate import check_positive_int

        k = check_positive_int(k, "k")
        single = np.ndim(queries) == 1
        batch = np.atleast_2d(np.asarray(queries)) if single else queries

        def one(shard: Any) -> Tuple[np.ndarray, np.ndarray]:
            return shard.search(batch, k, exclude=exclude)  # type: ignore[no-any-return]

        if self.threads == 1:
            parts = [one(s) for s in self.shards]
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                parts = list(pool.map(one, self.shards))
        keys, scores = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, self.metric == "l2")
        if single:
            return keys[0], scores[0]
        return keys, scores


def search_rows(index: Any, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """``index.search`` of a (q, dim) batch padded to (q, k) where the index holds fewer than k
    keys: key 2^64 - 1, score -inf (+inf for "l2"), so lists from shards of any size stack and
    merge (``merge_topk`` ranks the padding last; drop it with ``drop_padding``)."""
    keys, scores = index.search(queries, k)
    q = len(queries)
    if keys.shape[1] == k:
        return keys, scores
    pad = k - keys.shape[1]
    fill = np.inf if str(index.metric) == "l2" else -np.inf
    return (
        np.concatenate([keys, np.full((q, pad), np.iinfo(np.uint64).max, np.uint64)], axis=1),
        np.concatenate([scores, np.full((q, pad), fill, np.float32)], axis=1),
    )


def drop_padding(keys: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Cut the columns that are padding in every row (see ``search_rows``)."""
    real = keys != np.iinfo(np.uint64).max
    width = int(real.sum(axis=1).max()) if keys.size else 0
    return keys[:, :width], scores[:, :width]


# --------------------------------------------------------------------------------------------
# Embedding files


@dataclass
class EmbeddingShards:
    """Embedding files (``.npy``, (n_i, dim) float32 or float16) read through mmap, as one
    corpus: row j of file i has the global row number ``offsets[i] + j`` (its key).
    ``valid``: optional per-file boolean masks; rows marked False are left out of indexes."""

    paths: list[Path]
    valid: Optional[list[np.ndarray]] = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise ShardError("no embedding files given")
        self.paths = [Path(p) for p in self.paths]
        rows, dims = [], set()
        for p in self.paths:
            arr = self.open(p)
            if arr.ndim != 2 or arr.dtype not in (np.float32, np.float16):
                raise ShardError(
                    f"{p}: expected a (n, dim) float32 or float16 array, got {arr.dtype} {arr.shape}"
                )
            rows.append(int(arr.shape[0]))
            dims.add(int(arr.shape[1]))
        if len(dims) != 1:
            raise ShardError(f"embedding files disagree on the dimension: {sorted(dims)}")
        if self.valid is not None:
            if len(self.valid) != len(self.paths):
                raise ShardError("give one valid mask per embedding file")
            for p, v, n in zip(self.paths, self.valid, rows):
                if np.shape(v) != (n,):
                    raise ShardError(f"{p}: the valid mask has shape {np.shape(v)}, the file {n} rows")
        self.rows = rows
        self.dim = dims.pop()
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    @staticmethod
    def open(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise ShardError(f"{path}: no such embedding file") from None
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: not a readable .npy embedding file ({exc})") from None

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def mask(self, i: int) -> np.ndarray:
        return np.ones(self.rows[i], bool) if self.valid is None else np.asarray(self.valid[i], bool)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """A seeded uniform sample of up to n valid rows drawn across all files, float32, in
        global row order (the same rows whatever the number of processes)."""
        rng = np.random.default_rng(seed)
        n = min(n, self.total)
        picked = np.unique(rng.integers(0, self.total, size=n + n // 4 + 16))
        if picked.size < n:  # very small corpora: draw exactly
            picked = np.arange(self.total)
        picked = np.sort(rng.choice(picked, size=n, replace=False))
        out = []
        for i in range(len(self.paths)):
            lo, hi = np.searchsorted(picked, self.offsets[i : i + 2])
            local = picked[lo:hi] - self.offsets[i]
            local = local[self.mask(i)[local]]
            if local.size:
                out.append(np.asarray(self.open(self.paths[i])[local], np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


# --------------------------------------------------------------------------------------------
# Building IVF shards


def _write_manifest(
    out: Path, kind: str, files: Sequence[str], rows: Sequence[int], extra: dict[str, Any]
) -> None:
    from leanclip._fs import atomic_write

    data = {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        **extra,
        "shards": [{"file": f, "rows": int(n)} for f, n in zip(files, rows)],
    }
    with atomic_write(out / MANIFEST, "w") as f:
        json.dump(data, f, indent=1)


def build_ivf(
    embeddings: EmbeddingShards,
    out: PathLike,
    *,
    nlist: int = 1024,
    metric: str = "ip",
    dtype: str = "f16",
    pq: int = 0,
    rerank: int = 0,
    scan_dims: int = 0,
    seed: int = 0,
    sample: Optional[int] = None,
    chunk: int = 65536,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """IVF shards of ``embeddings`` in the folder ``out`` (one ``NNNNN.ivf`` per embedding file,
    ``quantizer.ivf``, ``manifest.json``); serve them with ``ShardedIndex.load(out, mmap=True)``.

    The quantizer (centroids, PQ codebooks with ``pq``, the principal directions batches rank
    by with ``scan_dims``) is trained by rank 0 on ``sample`` rows (default 64 * nlist, the
    engine's own training sample) drawn with ``seed`` across all files, so every file ranks and
    quantizes by the same ones. File i is
    written by rank ``i % world_size``: its rows are added in ``chunk``-row pieces to a copy of
    the quantizer (a file already there is kept: reruns resume). ``barrier`` waits for every
    rank (a no-op in one process). ``progress(done, total)`` is called as files are written.
    Returns a summary (vectors, files, bytes)."""
    from leanclip._engine import IVFIndex

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if chunk < 1:
        raise ShardError(f"chunk must be >= 1, got {chunk}")
    quantizer = out / QUANTIZER
    n_sample = 64 * nlist if sample is None else sample
    if rank == 0 and not quantizer.is_file():
        rows = embeddings.sample(n_sample, seed)
        if len(rows) < nlist:
            raise ShardError(f"the training sample holds {len(rows)} valid rows, fewer than nlist={nlist}")
        knobs: dict[str, Any] = {
            "metric": metric,
            "dtype": dtype,
            "nlist": nlist,
            "rerank": rerank,
            "pq": pq,
            "scan_dims": scan_dims,
        }
        index = IVFIndex(embeddings.dim, seed=seed, **knobs)
        index.train(rows)
        del rows
        index.save(quantizer)
        del index
    barrier()
    files = [f"{i:05d}.ivf" for i in range(len(embeddings.paths))]
    mine = [i for i in range(len(files)) if i % world_size == rank]
    for done, i in enumerate(mine, 1):
        target = out / files[i]
        if not target.is_file():
            index = IVFIndex.load(quantizer)
            arr = embeddings.open(embeddings.paths[i])
            valid = embeddings.mask(i)
            for start in range(0, embeddings.rows[i], chunk):
                stop = min(start + chunk, embeddings.rows[i])
                keep = np.flatnonzero(valid[start:stop])
                if keep.size:
                    keys = (embeddings.offsets[i] + start + keep).astype(np.uint64)
                    index.add(keys, np.asarray(arr[start:stop][keep], np.float32))
            del arr
            index.save(target)
            del index
        if progress is not None:
            progress(done, len(mine))
    barrier()
    if rank == 0:
        counts = [int(embeddings.mask(i).sum()) for i in range(len(files))]
        _write_manifest(
            out,
            "ivf",
            files,
            counts,
            {"quantizer": QUANTIZER, "dim": embeddings.dim, "metric": metric, "dtype": dtype, "nlist": nlist},
        )
    barrier()
    return {
        "vectors": int(sum(int(embeddings.mask(i).sum()) for i in range(len(files)))),
        "files": len(files),
        "bytes": int(sum((out / f).stat().st_size for f in files if (out / f).is_file())),
        "out": str(out),
    }


def build_exact(
    embeddings: EmbeddingShards,
    out: PathLike,
    *,
    metric: str = "ip",
    dtype: str = "f32",
    chunk: int = 65536,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Exact ``Index`` shards of ``embeddings`` (one ``NNNNN.lci`` per embedding file, keys the
    global row numbers, valid rows only) and ``manifest.json``; the same split over ranks as
    :func:`build_ivf`."""
    from leanclip._engine import Index

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [f"{i:05d}.lci" for i in range(len(embeddings.paths))]
    for i in range(rank, len(files), world_size):
        if (out / files[i]).is_file():
            continue
        index = Index(embeddings.dim, metric=metric, dtype=dtype)  # type: ignore[arg-type]
        arr, valid = embeddings.open(embeddings.paths[i]), embeddings.mask(i)
        for start in range(0, embeddings.rows[i], chunk):
            keep = np.flatnonzero(valid[start : start + chunk])
            if keep.size:
                keys = (embeddings.offsets[i] + start + keep).astype(np.uint64)
                index.add(keys, np.asarray(arr[start : start + chunk][keep], np.float32))
        del arr
        index.save(out / files[i])
    barrier()
    counts = [int(embeddings.mask(i).sum()) for i in range(len(files))]
    if rank == 0:
        _write_manifest(
            out, "exact", files, counts, {"dim": embeddings.dim, "metric": metric, "dtype": dtype}
        )
    barrier()
    return {"vectors": sum(counts), "files": len(files), "out": str(out)}


def embedding_files(paths: Iterable[PathLike]) -> list[Path]:
    """``.npy`` files from paths that are files or folders (a folder: its ``*.npy``, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.npy"))
            if not found:
                raise ShardError(f"{p}: no .npy embedding files in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ShardError(f"{p}: no such file or folder")
    return out
