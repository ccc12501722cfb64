"""Input validation shared by the Python-side search helpers (ApproxIndex, hard_negative_ids).

Every check runs before any state changes, so bad input raises a clear exception and leaves the
index untouched. Messages name the argument, the problem and the expected value, like the engine's.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from leanclip._engine import DTYPES, METRICS  # the engine's lists: one home
from leanclip.errors import IndexFileError as IndexFileError  # re-exported (approx.py)

_U64_MAX = np.iinfo(np.uint64).max


def _one_of(names: Tuple[str, ...]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def check_metric(metric: Any) -> str:
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f'unknown metric "{metric}": expected one of {_one_of(METRICS)}')
    return metric


def check_dtype(dtype: Any) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f'unknown dtype "{dtype}": expected one of {_one_of(DTYPES)}')
    return dtype


def check_positive_int(value: Any, name: str, maximum: Optional[int] = None) -> int:
    # bool is an int subclass; True as a dimension or k is always a mistake
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    if maximum is not None and not 1 <= value <= maximum:
        raise ValueError(f"{name} must be between 1 and {maximum}, got {int(value)}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {int(value)}")
    return int(value)


def as_keys(keys: Any, name: str = "keys", max_key: int = int(_U64_MAX)) -> np.ndarray:
    """A 1-D uint64 array of non-negative integer keys (<= max_key), or ValueError."""
    try:
        arr = np.asarray(keys)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be a 1-D array of non-negative integers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integers, got shape {list(arr.shape)}")
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.dtype.kind == "O":  # Python ints beyond int64 land here
        if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in arr):
            raise ValueError(f"{name} must be integers, got {arr.dtype} values")
        lo, hi = min(int(k) for k in arr), max(int(k) for k in arr)
        if lo < 0 or hi > _U64_MAX:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must be non-negative integers that fit in uint64, got {bad}")
        arr = np.array([int(k) for k in arr], dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{name} must be non-negative, got {int(arr.min())}")
    out = arr.astype(np.uint64, copy=False)
    if int(out.max()) > max_key:
        raise ValueError(f"{name} must be at most {max_key}, got {int(out.max())}")
    return out


def check_unique(keys: np.ndarray, name: str = "keys") -> None:
    if keys.size > 1:
        s = np.sort(keys)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise ValueError(f"key {int(dup[0])} appears more than once in the batch; {name} must be unique")


def as_matrix(
    values: Any,
    dim: Optional[int],
    name: str,
    allow_1d: bool = False,
    keep_f16: bool = False,
    rows: Optional[int] = None,
    check_finite: bool = True,
) -> Tuple[np.ndarray, bool]:
    """A C-contiguous (n, dim) float32 array (float16 kept when keep_f16) and whether the input
    was a single 1-D vector. Rejects non-numeric data, wrong shapes, and (unless
    ``check_finite`` is False: the engine checks the values itself) NaN and inf. ``rows``: the
    number of keys the rows go with, named in the shape error."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
    single = arr.ndim == 1
    if single and allow_1d:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        d = "dim" if dim is None else str(dim)
        if allow_1d:
            want = f"({d},) or (q, {d})"
        else:
            want = f"(n, {d})" if rows is None else f"({rows}, {d}) (len(keys), dim)"
        raise ValueError(f"{name} must have shape {want}, got {list(np.shape(values))}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column")
    if not (keep_f16 and arr.dtype == np.float16):
        arr = arr.astype(np.float32, copy=False)
    arr = np.ascontiguousarray(arr)
    if check_finite and arr.size and not np.isfinite(arr).all():
        row = int(np.nonzero(~np.isfinite(arr).all(axis=1))[0][0])
        raise ValueError(f"{name}[{row}] contains NaN or inf; expected finite values")
    return arr, single and allow_1d


def check_nonzero(arr: np.ndarray, name: str) -> np.ndarray:
    """Row norms (float32) of arr; ValueError naming the first zero row (undefined cosine)."""
    norms = np.linalg.norm(arr.astype(np.float32, copy=False), axis=1)
    zero = np.nonzero(norms == 0)[0]
    if zero.size:
        raise ValueError(
            f'{name}[{int(zero[0])}] is a zero vector, which has no direction under metric "cos"; '
            "expected a non-zero vector"
        )
    return norms


def as_groups(groups: Any, n: int, name: str) -> Optional[np.ndarray]:
    """None, or a 1-D int64 array of length n."""
    if groups is None:
        return None
    arr = np.asarray(groups)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} values must fit in int64")
    return np.ascontiguousarray(arr, dtype=np.int64)
