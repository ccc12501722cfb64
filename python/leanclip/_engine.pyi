"""Typed stubs of the compiled module ``leanclip._engine`` (Rust, crate rust/python)."""

from __future__ import annotations

import os
from typing import Literal, Optional, Tuple, Union, final

import numpy as np
import numpy.typing as npt

_Metric = Literal["cos", "ip", "l2"]
_DType = Literal["f32", "f16", "i8"]
_Path = Union[str, "os.PathLike[str]"]

__all__ = ["FORMAT_VERSION", "Index", "IndexFileError", "mine_hard_negatives", "simd_level"]

FORMAT_VERSION: int

class IndexFileError(Exception):
    """A bad, truncated, corrupted, foreign or other-version index file."""

@final
class Index:
    """Exact (flat) vector index keyed by uint64 ids.

    - "cos": vectors are stored unit-normalized (``get`` returns them so); scores are cosine
      similarities, highest first. "ip": inner products, highest first. "l2": squared
      Euclidean distances, lowest first. Equal scores are ordered by ascending key.
    - dtype "f16" stores half floats; "i8" stores int8 with one float32 scale per vector.
    - Every call releases the GIL; searches run concurrently with each other, writes are
      exclusive (a read-write lock).
    - Bad input raises ValueError (KeyError for keys) and changes nothing.
    """

    def __new__(cls, dim: int, metric: _Metric = "cos", dtype: _DType = "f32") -> Index: ...
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
    def keys(self) -> npt.NDArray[np.uint64]:
        """All keys in storage order (not sorted)."""
    def add(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add (n,) keys with (n, dim) vectors; all-or-nothing. KeyError if a key is present,
        ValueError for a key repeated in the batch, bad shape, NaN/inf, or a zero vector
        under "cos"."""
    def upsert(self, keys: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Insert new keys, replace the vectors of present ones; all-or-nothing."""
    def remove(self, keys: npt.ArrayLike) -> int:
        """Remove present keys (absent ones are ignored); returns how many were removed."""
    def get(self, keys: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, dim) float32 stored vectors (dequantized for f16/i8). KeyError if absent."""
    def search(
        self, queries: npt.ArrayLike, k: int = 10, exclude: Optional[npt.ArrayLike] = None
    ) -> Tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]]:
        """Exact top-k. queries (dim,) -> 1-D results; (q, dim) -> (q, k') results, with
        k' = min(k, len(index) - number of excluded keys present)."""
    def save(self, path: _Path) -> None:
        """Atomic write: temporary file in the same directory, fsync, rename, fsync dir."""
    @staticmethod
    def load(path: _Path, mmap: bool = False, verify: bool = True) -> Index:
        """Open a saved index. Header, keys and scales are always checked (IndexFileError).
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
    without those instructions the scan is exact."""

def simd_level() -> str:
    """The instruction set the kernels use on this CPU: "avx512", "avx2", "neon" or "scalar"."""
