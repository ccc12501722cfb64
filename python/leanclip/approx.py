"""ApproxIndex: usearch's HNSW graph behind the API and errors of the exact ``leanclip.Index``.

For corpora too large for exact search. Keys, add / upsert / remove / get / search / save / load
behave as in the exact Index; search results are approximate (recall is tuned by
``expansion_search``). Differences, all forced by usearch and checked here rather than left to
crash or corrupt:

- Under "cos" vectors are stored L2-normalized, so ``get`` returns unit vectors.
- dtype "i8" is supported for "cos" only: usearch's int8 kernels have no per-vector scale, so we
  scale each unit vector to [-127, 127] ourselves (usearch's own float->int8 cast assumes values
  in [-1, 1] and collapses recall on embeddings); that keeps cosines but not inner products or
  distances. "f16" data is converted to float16 before it reaches usearch for the same reason.
- Key 2**64 - 1 is usearch's empty-slot marker and is refused.
- Removal leaves a tombstone in the graph (usearch); queries that the graph answers with fewer
  than k live results are re-run exhaustively, so a search always returns min(k, len) results.
- The file is a 64-byte leanclip header (magic, version, dim, metric, dtype, count, CRC-32 of
  the body) followed by usearch's own serialization. ``load`` checks header and checksum before
  usearch parses a byte, because usearch can crash on a corrupt file. ``mmap=True`` maps the file
  through usearch's view (no copy of the vectors or graph into memory; the checksum still reads
  the file once); such an index is read-only.
"""

from __future__ import annotations

import mmap as _mmap
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np

from leanclip._fs import PathLike, atomic_write
from leanclip._validate import (
    IndexFileError,
    as_keys,
    as_matrix,
    check_dtype,
    check_metric,
    check_nonzero,
    check_positive_int,
    check_unique,
)

__all__ = ["ApproxIndex", "IndexFileError"]

_MAX_KEY = int(np.iinfo(np.uint64).max) - 1  # usearch reserves the all-ones key for empty slots
_USEARCH_METRIC = {"cos": "cos", "ip": "ip", "l2": "l2sq"}
_METRIC_CODE = {"cos": 1, "ip": 2, "l2": 3}
_DTYPE_CODE = {"f32": 1, "f16": 2, "i8": 3}
_MAGIC = b"LCAPPRX\x00"
_VERSION = 1
# magic, version, metric, dtype, dim, connectivity, expansion_add, expansion_search,
# count, body length, body crc32; then the crc32 of those bytes; zero padding to 64 bytes
_HEAD = struct.Struct("<8sIBBxxIIIIQQI")
_HEADER_SIZE = 64
_COPY_CHUNK = 1 << 24


def _usearch() -> Any:
    # usearch 2.26's extension, once loaded, breaks onnxruntime's later import (a segfault in
    # libstdc++ symbols); onnxruntime loaded first is safe, so load it first when it exists.
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    try:
        from usearch.index import Index as UIndex
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("ApproxIndex needs usearch: pip install 'leanclip[approx]'") from exc
    return UIndex


class ApproxIndex:
    """Approximate (HNSW) vector index keyed by uint64 ids, with the exact Index's API.

    ``connectivity`` is HNSW's M, ``expansion_add`` its efConstruction and ``expansion_search``
    its ef (settable at any time: higher means better recall, slower queries).
    """

    def __init__(
        self,
        dim: int,
        metric: str = "cos",
        dtype: str = "f32",
        connectivity: int = 16,
        expansion_add: int = 128,
        expansion_search: int = 64,
    ) -> None:
        self._dim = check_positive_int(dim, "dim", 65536)
        self._metric = check_metric(metric)
        self._dtype = check_dtype(dtype)
        if self._dtype == "i8" and self._metric != "cos":
            raise ValueError(
                f"dtype 'i8' supports metric 'cos' only in ApproxIndex, got {metric!r}: usearch's "
                "int8 kernels have no per-vector scale, so inner products and distances would be "
                "wrong; use dtype 'f16' or 'f32'"
            )
        self._connectivity = check_positive_int(connectivity, "connectivity")
        self._expansion_add = check_positive_int(expansion_add, "expansion_add")
        check_positive_int(expansion_search, "expansion_search")
        self._index = _usearch()(
            ndim=self._dim,
            metric=_USEARCH_METRIC[self._metric],
            dtype=self._dtype,
            connectivity=self._connectivity,
            expansion_add=self._expansion_add,
            expansion_search=int(expansion_search),
        )
        self._lock = threading.RLock()
        self._mapped: Optional[_mmap.mmap] = None  # keeps the view's memory alive

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def connectivity(self) -> int:
        return self._connectivity

    @property
    def expansion_add(self) -> int:
        return self._expansion_add

    @property
    def expansion_search(self) -> int:
        return int(self._index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        self._index.expansion_search = check_positive_int(value, "expansion_search")

    @property
    def read_only(self) -> bool:
        """True for an index opened with ``load(path, mmap=True)``."""
        return self._mapped is not None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
            return False
        if not 0 <= int(key) <= _MAX_KEY:
            return False
        return bool(self._index.contains(int(key)))

    def __repr__(self) -> str:
        ro = ", read-only" if self.read_only else ""
        return (
            f"ApproxIndex(dim={self._dim}, metric={self._metric!r}, dtype={self._dtype!r}, "
            f"len={len(self)}, connectivity={self._connectivity}{ro})"
        )

    def keys(self) -> np.ndarray:
        """All keys, uint64, in storage order."""
        with self._lock:
            return np.array(self._index.keys[:], dtype=np.uint64)  # a slice: live keys only

    # ------------------------------------------------------------------ conversion
    def _prepare(
        self, values: Any, name: str, allow_1d: bool, rows: Optional[int] = None
    ) -> Tuple[np.ndarray, bool]:
        """Validated rows in the form usearch stores them (see the module docstring)."""
        arr, single = as_matrix(values, self._dim, name, allow_1d=allow_1d, rows=rows)
        if self._metric == "cos":
            norms = check_nonzero(arr, name)
            arr = arr / norms[:, None]
        if self._dtype == "f16":
            with np.errstate(over="ignore"):
                half = arr.astype(np.float16)
            if not np.isfinite(half).all():
                raise ValueError(f"{name} has values beyond the float16 range (|x| > 65504)")
            return half, single
        if self._dtype == "i8":  # rows are unit vectors here: scale each to use the full range
            scale = 127.0 / np.abs(arr).max(axis=1, keepdims=True)
            return np.rint(arr * scale).astype(np.int8), single
        return np.ascontiguousarray(arr, dtype=np.float32), single

    def _check_writable(self) -> None:
        if self._mapped is not None:
            raise RuntimeError(
                "this ApproxIndex was opened with mmap=True and is read-only; "
                "use ApproxIndex.load(path) to get a writable copy"
            )

    # ------------------------------------------------------------------ mutation
    def add(self, keys: Any, vectors: Any) -> None:
        """Add a batch; all-or-nothing. KeyError if a key is present, ValueError if one repeats."""
        ks = as_keys(keys, "keys", _MAX_KEY)
        data, _ = self._prepare(vectors, "vectors", allow_1d=False, rows=ks.shape[0])
        _check_count(ks, data, self._dim)
        check_unique(ks)
        with self._lock:
            self._check_writable()
            if ks.size == 0:
                return
            present = np.asarray(self._index.contains(ks), dtype=bool)
            if present.any():
                raise KeyError(f"key {int(ks[np.argmax(present)])} is already in the index")
            self._index.add(ks, data)

    def upsert(self, keys: Any, vectors: Any) -> None:
        """Insert or replace; ValueError if a key repeats within the batch."""
        ks = as_keys(keys, "keys", _MAX_KEY)
        data, _ = self._prepare(vectors, "vectors", allow_1d=False, rows=ks.shape[0])
        _check_count(ks, data, self._dim)
        check_unique(ks)
        with self._lock:
            self._check_writable()
            if ks.size == 0:
                return
            present = np.asarray(self._index.contains(ks), dtype=bool)
            if present.any():
                self._index.remove(ks[present])
            self._index.add(ks, data)

    def remove(self, keys: Any) -> int:
        """Remove the keys that are present; returns how many were. Absent keys are ignored."""
        ks = np.unique(as_keys(keys, "keys"))
        ks = ks[ks <= _MAX_KEY]
        with self._lock:
            self._check_writable()
            if ks.size == 0:
                return 0
            present = ks[np.asarray(self._index.contains(ks), dtype=bool)]
            if present.size:
                self._index.remove(present)
            return int(present.size)

    # ------------------------------------------------------------------ reading
    def get(self, keys: Any) -> np.ndarray:
        """(n, dim) float32 vectors (unit vectors under "cos"); KeyError on an absent key."""
        ks = as_keys(keys, "keys")
        with self._lock:
            if ks.size == 0:
                return np.empty((0, self._dim), dtype=np.float32)
            present = np.asarray(self._index.contains(ks), dtype=bool) & (ks <= _MAX_KEY)
            if not present.all():
                raise KeyError(f"key {int(ks[np.argmin(present)])} is not in the index")
            rows = self._index.get(ks)
        out = np.stack([np.asarray(r).reshape(-1) for r in rows]).astype(np.float32)
        if self._dtype == "i8":  # undo our per-row scale: stored rows are scaled unit vectors
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def search(
        self, queries: Any, k: int = 10, exclude: Any = None, *, exact: bool = False
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k per query: uint64 keys and float32 scores, best first, k' = min(k, len).

        Scores as in Index: cosine similarity / inner product (highest first) or squared L2
        distance (lowest first); equal scores by ascending key. ``exclude``: keys never returned.
        One query of shape (dim,) gives 1-D arrays. ``exact=True`` scans every vector.
        """
        k = check_positive_int(k, "k")
        q, single = self._prepare(queries, "queries", allow_1d=True)
        excl = None if exclude is None else np.unique(as_keys(exclude, "exclude"))
        with self._lock:
            n_excl = 0
            if excl is not None and excl.size:
                excl = excl[(excl <= _MAX_KEY)]
                excl = excl[np.asarray(self._index.contains(excl), dtype=bool)] if excl.size else excl
                n_excl = int(excl.size)
            kk = min(k, len(self._index) - n_excl)
            if kk <= 0 or q.shape[0] == 0:
                keys = np.empty((q.shape[0], 0), dtype=np.uint64)
                scores = np.empty((q.shape[0], 0), dtype=np.float32)
            else:
                keys, dist = self._top(q, kk, kk + n_excl, excl, exact)
                scores = self._scores(dist)
        if single:
            return keys[0], scores[0]
        return keys, scores

    def _top(
        self, q: np.ndarray, kk: int, fetch: int, excl: Optional[np.ndarray], exact: bool
    ) -> Tuple[np.ndarray, np.ndarray]:
        """kk best live, non-excluded results per row as (keys, usearch distances), sorted."""
        m = self._index.search(q, fetch, exact=exact)
        if hasattr(m, "counts"):
            keys = np.asarray(m.keys, dtype=np.uint64).reshape(q.shape[0], -1)
            dist = np.asarray(m.distances, dtype=np.float32).reshape(q.shape[0], -1)
            counts = np.asarray(m.counts).reshape(-1)
        else:  # usearch answers a one-row batch with only its valid matches
            got = len(m.keys)
            keys = np.zeros((1, fetch), dtype=np.uint64)
            dist = np.zeros((1, fetch), dtype=np.float32)
            keys[0, :got], dist[0, :got] = m.keys, m.distances
            counts = np.array([got])
        valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
        if excl is not None and excl.size:
            valid &= ~np.isin(keys, excl)
        short = valid.sum(axis=1) < kk
        if short.any() and not exact:
            # the graph reached too few live results (tombstones, exclusions): scan those rows
            k2, d2 = self._top(q[short], kk, fetch, excl, exact=True)
            full_k = np.empty((q.shape[0], kk), dtype=np.uint64)
            full_d = np.empty((q.shape[0], kk), dtype=np.float32)
            full_k[short], full_d[short] = k2, d2
            ok = ~short
            if ok.any():
                full_k[ok], full_d[ok] = self._select(keys[ok], dist[ok], valid[ok], kk)
            return full_k, full_d
        return self._select(keys, dist, valid, kk)

    @staticmethod
    def _select(
        keys: np.ndarray, dist: np.ndarray, valid: np.ndarray, kk: int
    ) -> Tuple[np.ndarray, np.ndarray]:
        if not valid.all():  # move valid entries to the front, keeping their order
            order = np.argsort(~valid, axis=1, kind="stable")
            keys = np.take_along_axis(keys, order, axis=1)
            dist = np.take_along_axis(dist, order, axis=1)
        keys, dist = keys[:, :kk], dist[:, :kk]
        # usearch does not order ties; the API promises ascending key among equal scores
        order = np.lexsort((keys, dist), axis=-1)
        return np.take_along_axis(keys, order, axis=1), np.take_along_axis(dist, order, axis=1)

    def _scores(self, dist: np.ndarray) -> np.ndarray:
        # usearch reports distances: 1 - cos, 1 - dot, and squared L2
        if self._metric == "l2":
            return np.ascontiguousarray(dist, dtype=np.float32)
        return (np.float32(1.0) - dist).astype(np.float32)

    # ------------------------------------------------------------------ files
    def save(self, path: PathLike) -> None:
        """Write atomically: a temporary file beside ``path``, fsync, rename, fsync the folder."""
        path = Path(os.fspath(path))
        body_tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.body")
        try:
            with self._lock:
                self._index.save(str(body_tmp))
                count = len(self._index)
            body_len = body_tmp.stat().st_size
            crc = 0
            with open(body_tmp, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    crc = zlib.crc32(chunk, crc)
            head = _HEAD.pack(
                _MAGIC,
                _VERSION,
                _METRIC_CODE[self._metric],
                _DTYPE_CODE[self._dtype],
                self._dim,
                self._connectivity,
                self._expansion_add,
                self.expansion_search,
                count,
                body_len,
                crc,
            )
            head = head + struct.pack("<I", zlib.crc32(head))
            head = head.ljust(_HEADER_SIZE, b"\x00")
            with atomic_write(path) as dst, open(body_tmp, "rb") as src:
                dst.write(head)
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
        finally:
            body_tmp.unlink(missing_ok=True)

    @staticmethod
    def load(path: PathLike, mmap: bool = False) -> "ApproxIndex":
        """Open a saved index; IndexFileError for anything but an intact ApproxIndex file.

        ``mmap=True`` maps the file instead of reading it into memory; the result is read-only.
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEADER_SIZE)
            meta = _parse_header(head, size, path)
            if mmap:
                mapped = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
                body: Any = memoryview(mapped)[_HEADER_SIZE:]
            else:
                mapped = None
                body = f.read(meta["body_len"])
        if zlib.crc32(body) != meta["crc"]:
            raise IndexFileError(f"{path}: checksum mismatch, the file is corrupt")
        index = ApproxIndex(
            meta["dim"],
            meta["metric"],
            meta["dtype"],
            meta["connectivity"],
            meta["expansion_add"],
            meta["expansion_search"],
        )
        try:
            info = index._index.metadata(body)
        except Exception as exc:
            raise IndexFileError(f"{path}: unreadable usearch body: {exc}") from None
        if (
            not info
            or int(info.get("dimensions", -1)) != meta["dim"]
            or getattr(info.get("kind_metric"), "name", "").lower() != _USEARCH_METRIC[meta["metric"]]
            or getattr(info.get("kind_scalar"), "name", "").lower() != meta["dtype"]
        ):
            raise IndexFileError(f"{path}: usearch body does not match the header")
        try:
            if mapped is not None:
                index._index.view(body)
                index._mapped = mapped
            else:
                index._index.load(body)
        except Exception as exc:
            raise IndexFileError(f"{path}: usearch could not open the body: {exc}") from None
        if len(index._index) != meta["count"] or index._index.ndim != meta["dim"]:
            raise IndexFileError(
                f"{path}: holds {len(index._index)} vectors of dim {index._index.ndim}, "
                f"header says {meta['count']} of dim {meta['dim']}"
            )
        return index


def _check_count(keys: np.ndarray, data: np.ndarray, dim: int) -> None:
    if data.shape[0] != keys.shape[0]:
        raise ValueError(
            f"vectors must have shape ({keys.shape[0]}, {dim}) (len(keys), dim), got {list(data.shape)}"
        )


def _parse_header(head: bytes, size: int, path: str) -> dict:
    if len(head) < _HEADER_SIZE:
        raise IndexFileError(f"{path}: truncated ({size} bytes), not an ApproxIndex file")
    if head[:8] != _MAGIC:
        raise IndexFileError(f"{path}: not an ApproxIndex file (bad magic)")
    fields = _HEAD.unpack_from(head)
    (stored_crc,) = struct.unpack_from("<I", head, _HEAD.size)
    if zlib.crc32(head[: _HEAD.size]) != stored_crc or any(head[_HEAD.size + 4 :]):
        raise IndexFileError(f"{path}: header checksum mismatch, the file is corrupt")
    _, version, metric, dtype, dim, conn, ef_add, ef_search, count, body_len, crc = fields
    if version != _VERSION:
        raise IndexFileError(f"{path}: ApproxIndex format version {version}, this build reads {_VERSION}")
    metrics = {v: k for k, v in _METRIC_CODE.items()}
    dtypes = {v: k for k, v in _DTYPE_CODE.items()}
    if metric not in metrics or dtype not in dtypes or dim < 1 or conn < 1 or ef_add < 1 or ef_search < 1:
        raise IndexFileError(f"{path}: invalid header fields")
    if size != _HEADER_SIZE + body_len:
        raise IndexFileError(
            f"{path}: {size} bytes, header says {_HEADER_SIZE + body_len} (truncated or padded)"
        )
    return dict(
        metric=metrics[metric],
        dtype=dtypes[dtype],
        dim=dim,
        connectivity=conn,
        expansion_add=ef_add,
        expansion_search=ef_search,
        count=count,
        body_len=body_len,
        crc=crc,
    )
