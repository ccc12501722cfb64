"""Typed stubs of the compiled module ``leanclip._engine`` (Rust, crate rust/python)."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Tuple, Union, final, type_check_only

import numpy as np
import numpy.typing as npt

_Metric = Literal["cos", "ip", "l2"]
_DType = Literal["f32", "f16", "i8"]
_Path = Union[str, "os.PathLike[str]"]

from leanclip.errors import IndexFileError as IndexFileError

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "METRICS",
    "IVFIndex",
    "Index",
    "IndexFileError",
    "mine_hard_negatives",
    "simd_level",
]

FORMAT_VERSION: int
DTYPES: Tuple[str, ...]
"""The storage types, ("f32", "f16", "i8")."""
METRICS: Tuple[str, ...]
"""The metrics, ("cos", "ip", "l2")."""

@type_check_only
class _KeyedVectors:
    """What ``Index`` and ``IVFIndex`` share (stubs only: the two classes are unrelated at
    runtime)."""

    @property
    def dim(self) -> int: ...
    @property
    def metric(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def read_only(self) -> bool:
        """True for an index opened with ``load(..., mmap=True)``."""
    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
    def upsert(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Insert new keys, replace the vectors of present ones; all-or-nothing."""
    def remove(self, keys: npt.ArrayLike) -> int:
        """Remove present keys (absent ones are ignored); returns how many were removed."""

@final
class Index(_KeyedVectors):
    """Exact (flat) vector index keyed by uint64 ids.

    - "cos": vectors are stored unit-normalized (``get`` returns them so); scores are cosine
      similarities, highest first. "ip": inner products, highest first. "l2": squared
      Euclidean distances, lowest first. Equal scores are ordered by ascending key.
    - dtype "f16" stores half floats; "i8" stores int8 with one float32 scale per vector.
    - Every call releases the GIL; searches run concurrently with each other, writes are
      exclusive (a read-write lock).
    - Bad input raises ValueError (KeyError for keys) and changes nothing. A vector is refused
      if it holds NaN or inf, if its squared norm exceeds float32 max / 4 (~8.5e37, so no score
      can overflow), and under "cos" if it is zero or its squared norm is below 2^-100
      (~7.9e-31, too small to normalize in float32); the message names the row
      (``vectors[i]`` / ``queries[i]``). Queries are checked the same way.
    - Vectors and queries are float arrays (float16/32/64) or lists of numbers; a numpy array
      of integers is refused (ValueError "must be float32 or float64"): most often keys or
      uint8 pixels passed by mistake. Integer arguments out of range are ValueError.
    - An index opened with ``mmap=True`` checks before every read of the file that the file is
      still the one it mapped (same inode, size, mtime and ctime); if not, IndexFileError.
    """

    def __new__(cls, dim: int, metric: _Metric = "cos", dtype: _DType = "f32") -> Index: ...
    def keys(self) -> npt.NDArray[np.uint64]:
        """All keys in storage order (not sorted)."""
    def add(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add (n,) keys with (n, dim) vectors; all-or-nothing. KeyError if a key is present,
        ValueError for a key repeated in the batch, bad shape, NaN/inf, or a zero vector
        under "cos"."""
    def get(self, keys: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, dim) float32 stored vectors (dequantized for f16/i8). KeyError if absent."""
    def astype(self, dtype: _DType) -> Index:
        """A new in-memory (writable) index with the same keys in the same order, dim and
        metric, its vectors converted to ``dtype`` from the stored values (f16/i8 -> f32 does
        not bring precision back). Works on an mmap index too. ValueError naming the key if a
        stored vector does not fit ``dtype`` (float16 range under "ip"/"l2")."""
    def search(
        self, queries: npt.ArrayLike, k: int = 10, exclude: Optional[npt.ArrayLike] = None
    ) -> Tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]]:
        """Exact top-k. queries (dim,) -> 1-D results; (q, dim) -> (q, k') results, with
        k' = min(k, len(index) - number of excluded keys present). Every key returned was
        added: rows whose score is NaN (only a crafted file can store NaN/inf vectors) rank
        last, by ascending key, with score NaN."""
    def save(self, path: _Path) -> None:
        """Atomic write: temporary file in the same directory, fsync, rename, fsync dir."""
    @staticmethod
    def load(path: _Path, mmap: bool = False, verify: bool = True) -> Index:
        """Open a saved index. Header, keys and scales are always checked (IndexFileError).
        Anything but a regular file (a directory, FIFO, device) is refused with
        IndexFileError before it is read.
        verify=True also checks the vectors' checksum (reads the whole file) and that no key
        repeats. With mmap=True and verify=False the vectors are neither read nor checked
        until ``verify()``, and the key map is built on the first key lookup (``in``, ``get``,
        ``exclude``). mmap=True gives a read-only index (RuntimeError on writes)."""
    def verify(self) -> None:
        """Check what a lazy mmap load deferred: the vectors' checksum and repeated keys
        (IndexFileError); a no-op for an index held in memory."""

def mine_hard_negatives(
    queries: npt.ArrayLike,
    corpus: npt.ArrayLike,
    k: int,
    query_groups: Optional[npt.ArrayLike] = None,
    corpus_groups: Optional[npt.ArrayLike] = None,
    metric: _Metric = "ip",
    dtype: _DType = "f32",
    precision: Literal["f32", "bf16", "i8"] = "f32",
) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Top-k corpus rows per query: int64 (q, k) row indices into corpus and float32 (q, k)
    scores, best first, ties by ascending index. Rows whose group equals the query's group
    are skipped. Where fewer than k rows are eligible the rest are -1 with score -inf
    (+inf for "l2"). Inputs float32 or float16 (read without a copy); dtype is the precision
    the corpus is scored at ("f16" / "i8" quantize a copy of it). precision is the scan's:
    "i8" (AVX512-VNNI) / "bf16" (AVX512-BF16) scan in low precision for k + max(k, 32)
    (i8) / k + max(k, 16) (bf16) candidates per query and re-score them at dtype's
    precision, so scores stay exact (docs/mining.md: measured top-10 agreement with "f32");
    without those instructions the scan is exact.

    Score contract: with dtype "f16" or "i8" the scores are bit for bit those an
    ``Index(dim, metric, dtype)`` holding the corpus reports for each query searched alone
    (the corpus is encoded as it stores it: unit length first under "cos"), whatever the
    precision ("f32" scans those rows with f32 products and re-scores with the same kernels).
    With dtype "f32" they are the f32 product's, within float32 rounding of ``Index``'s."""

def simd_level() -> str:
    """The instruction set the kernels use on this CPU: "amx" (AVX-512 with AMX tile products),
    "avx512", "avx2", "neon" or "scalar"."""

@final
class IVFIndex(_KeyedVectors):
    """Approximate (inverted-file) vector index keyed by uint64 ids: the same API and errors as
    ``Index``, plus its knobs.

    - Without ``nlist`` the index chooses its knobs (docs/ivf.md, "Say the recall you need"):
      the dtype now (f16; i8 with ``memory="low"`` or ``recall`` below 0.95), and when it
      trains ``nlist`` (the power of two nearest 2 sqrt(n)), ``pq`` codes and ``scan_dims``
      from the spectrum of its training sample; knobs given are kept. With ``nlist`` given,
      the rest default as listed below (f32, no codes, all dimensions). ``tune(0.95)`` then
      sets nprobe / nprobe_single / shortlist for a recall; ``repr`` and ``auto`` say what was
      chosen and why.

    - k-means (seeded by ``seed``) splits the vectors into ``nlist`` lists; a search scores the
      query against the list centroids and scans the ``nprobe`` nearest lists (default
      max(1, nlist // 32)). A batch of queries scans each probed list once for all the queries
      probing it. With ``nprobe >= nlist`` results equal ``Index``'s (exact).
    - Before training the index is one list and searches are exact. It trains itself once it
      holds ``train_threshold`` vectors (default 64 * nlist; 0 = only on ``train``/``retrain``);
      adds after training go to the nearest list.
    - dtype "f16" / "i8" store lists quantized; ``rerank > 0`` keeps float32 copies too
      (4 bytes per dimension per vector more) and re-scores the best ``max(k, rerank)``
      candidates exactly. On a CPU with VNNI a batch scans f16 lists with an i8 copy (kept
      after the first batch) and re-scores its best candidates from the f16 rows: an f16
      index ranks and scores like f16 at about the speed of i8.
    - ``pq > 0`` also keeps a 4-bit product-quantization code per vector (``pq`` sub-vectors
      of ``dim // pq`` values, 16 centroids each: ``pq / 2`` bytes; ``pq`` even, at most 256,
      dividing ``dim``). Once trained, single queries (fewer than 8 per call) scan those codes
      instead of the stored vectors (one lookup table per query, summed with byte shuffles) and
      re-score their best ``shortlist`` candidates (default 100) from the stored vectors: a
      graph's single-query speed for ``pq / 2`` bytes a vector. Batches scan the stored vectors
      as without codes. Results report the stored vectors' scores either way.
    - ``scan_dims > 0`` (dtype "f16" / "i8", metric "cos" / "ip"): batches rank by the
      vectors projected onto their ``scan_dims`` principal directions (trained with the
      centroids, from the same sample, and saved with the index: copies of one trained
      quantizer, such as the shards of a manifest, rank by the same directions; or trained by
      ``train_directions``; an index without trained ones, e.g. a file saved before they were
      stored, computes them from a sample of its vectors at the first batch), then re-score
      each query's best ``k + max(k, 64)`` from the stored vectors. Fewer multiply-adds and a
      smaller packed copy for real embeddings, whose variance sits in few directions (MiniLM:
      192 of 384 keep 99.96% of the true top 10 among the re-scored); batches are then
      approximate even at ``nprobe >= nlist``. Single queries are unaffected.
      Needs ``dim <= 2048``: the directions take a dense ``dim x dim`` eigendecomposition
      (~24 * dim^2 bytes, ~1 minute at 2048); a larger dim is a ValueError at construction,
      in the setter and (IndexFileError) at load, before anything is allocated.
    - ``remove`` swaps the list's last vector into the hole (O(1), no tombstones).
    - Vectors are checked as ``Index`` checks them (one shared check) in ``add``, ``upsert``,
      ``train`` and ``search``: ValueError naming the row, index unchanged.
    - Integer arguments out of range (``nprobe=2**70``, ``seed=-1``) are ValueError.
    - An index opened with ``mmap=True`` checks around every read of its file (search, get,
      keys, verify, save) that the file is still the one it mapped; if it was truncated or
      rewritten, IndexFileError (never SIGBUS or other data), and ``save`` writes nothing.
    - Every call releases the GIL; searches run concurrently, writes are exclusive.
    """

    def __new__(
        cls,
        dim: int,
        metric: _Metric = "cos",
        dtype: Optional[_DType] = None,
        nlist: Optional[int] = None,
        nprobe: Optional[int] = None,
        rerank: int = 0,
        seed: int = 0,
        train_threshold: Optional[int] = None,
        pq: Optional[int] = None,
        shortlist: Optional[int] = None,
        scan_dims: Optional[int] = None,
        recall: Optional[float] = None,
        memory: Optional[Literal["low", "normal"]] = None,
    ) -> IVFIndex: ...
    @property
    def nlist(self) -> int: ...
    @property
    def nprobe(self) -> int:
        """Lists scanned per query (settable, >= 1)."""
    @nprobe.setter
    def nprobe(self, value: int) -> None: ...
    @property
    def nprobe_single(self) -> int:
        """Lists a single query (fewer than 8 per call) scans (settable; set by ``tune``;
        setting ``nprobe`` makes single queries follow it again)."""
    @nprobe_single.setter
    def nprobe_single(self, value: int) -> None: ...
    @property
    def single_scan(self) -> Literal["rows", "codes", "product"]:
        """How single queries (fewer than 8 per call) scan their lists: "rows" (exact, the
        single-query kernels), "codes" (an index with ``pq > 0``: the 4-bit codes, then
        ``shortlist`` re-scored) or "product" (as a batch does: each list's packed i8 copy,
        projected onto ``scan_dims`` directions if set, then the best ``k + margin``
        re-scored from the stored vectors). Settable; ``tune`` sets it to the way that reads
        the fewest bytes at the target recall, and it is saved with the index. "product"
        needs dtype "f16" / "i8", metric "cos" / "ip" and a packed copy smaller than the rows
        (ValueError otherwise)."""
    @single_scan.setter
    def single_scan(self, value: Literal["rows", "codes", "product"]) -> None: ...
    @property
    def tuned(self) -> Optional[Tuple[float, int]]:
        """(target recall, k) of the last ``tune``, saved with the index; None if never tuned."""
    @property
    def auto(self) -> list[str]:
        """One line per knob the index chose itself, and why (empty: laid out by hand)."""
    def tune(
        self, target_recall: float = 0.95, k: int = 10, queries: Optional[npt.ArrayLike] = None
    ) -> dict[str, Any]:
        """Sets nprobe (batches), nprobe_single and, with codes, shortlist to the cheapest
        settings whose recall@k against the exact answer reaches ``target_recall`` on sample
        queries: ``queries`` (up to 1,000 used) or 1,000 stored vectors held out (their near
        duplicates excluded too). Returns what it measured: ``recall`` / ``recall_single`` with
        ``spread`` / ``spread_single`` (1.96 standard errors), ``nprobe``, ``nprobe_single``,
        ``single_scan``, ``shortlist`` (None unless single queries scan codes), ``scan_dims``,
        ``queries``, ``held_out``,
        ``settings_measured``, ``seconds``. Single queries scan rows, codes or by the product,
        whichever reads the fewest bytes at the target. Codes or scan_dims the index chose
        itself are dropped where they lose. Needs a trained, writable index."""
    @property
    def rerank(self) -> int:
        """Candidates re-scored from float32 copies (settable; > 0 needs an index created
        with rerank > 0)."""
    @rerank.setter
    def rerank(self, value: int) -> None: ...
    @property
    def pq(self) -> int:
        """Product-quantization sub-quantizers (0: no codes)."""
    @property
    def shortlist(self) -> int:
        """Candidates of the code scan re-scored from the stored vectors (settable, >= 1)."""
    @shortlist.setter
    def shortlist(self, value: int) -> None: ...
    @property
    def scan_dims(self) -> int:
        """Principal directions batches rank by (settable; 0: all dimensions, else below
        ``dim``; f16 / i8 under cos / ip only)."""
    @scan_dims.setter
    def scan_dims(self, value: int) -> None: ...
    @property
    def seed(self) -> int: ...
    @property
    def train_threshold(self) -> int: ...
    @property
    def is_trained(self) -> bool: ...
    def keys(self) -> npt.NDArray[np.uint64]:
        """All keys, list by list (not sorted)."""
    def list_sizes(self) -> npt.NDArray[np.uint64]:
        """Vectors per list (one list before training)."""
    def add(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add (n,) keys with (n, dim) vectors; all-or-nothing (errors as ``Index.add``)."""
    def get(self, keys: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, dim) float32 vectors: the float32 copies when kept, else the stored ones
        dequantized. KeyError if absent."""
    def train(self, vectors: npt.ArrayLike) -> None:
        """Train the centroids (with ``pq``, the codebooks; with ``scan_dims``, the principal
        directions) on (n, dim) vectors (n >= nlist; a seeded sample of at most 64 * nlist is
        used) and move the stored vectors to their lists."""
    def retrain(self) -> None:
        """Retrain on the current contents (for lists grown skewed) and redistribute."""
    def train_directions(self, vectors: npt.ArrayLike) -> None:
        """Train the principal directions batches with ``scan_dims`` rank by on (n, dim)
        vectors (n >= 1; at most 16,384 evenly spaced rows are used): e.g. a sample across
        every shard of a manifest. Saved with the index, kept until it is trained again.
        ValueError where ``scan_dims`` is refused (dtype f32, metric l2, dim > 2048)."""
    @property
    def directions(self) -> Optional[npt.NDArray[np.float32]]:
        """The trained principal directions, (dim, dim) float32, one per row by decreasing
        variance (None when not trained: ``train`` without ``scan_dims``, or a file saved
        before they were stored)."""
    def search(
        self, queries: npt.ArrayLike, k: int = 10, exclude: Optional[npt.ArrayLike] = None
    ) -> Tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]]:
        """Approximate top-k, shaped like ``Index.search``: k' = min(k, len(index) - excluded
        keys present) results per query (lists beyond nprobe are scanned when the probed ones
        hold too few). Equal scores rank by ascending key."""
    def save(self, path: _Path) -> None:
        """Atomic write (temporary file, fsync, rename, fsync of the directory)."""
    @staticmethod
    def load(path: _Path, mmap: bool = False, verify: bool = True) -> IVFIndex:
        """Open a saved IVF index (IndexFileError for a bad, corrupt, truncated or foreign
        file; anything but a regular file is refused). verify=True checks the vectors'
        checksum; mmap=True maps the file read-only (RuntimeError on writes)."""
    def verify(self) -> None:
        """Check the vectors of an mmap-opened index against the file's checksum."""
