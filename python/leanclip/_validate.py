"""Input validation of the Python-side helpers (hard_negative_ids, sharded search).

Every check runs before any work starts, so bad input raises a clear exception. Messages name the
argument, the problem and the expected value, like the engine's.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from leanclip._engine import DTYPES, METRICS  # the engine's lists: one home


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
