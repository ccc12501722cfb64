"""Issue 25, IVF items: an IVFIndex must be as hard to break as Index.

A mapped file truncated or rewritten by another program, scan_dims at large dimensions,
vectors the exact index refuses, panics across the binding, integer arguments out of range
and integer vectors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from leanclip import Index, IVFIndex
from leanclip.errors import IndexFileError

DIM = 16

# (dtype, rerank, pq): every storage, with float32 copies and with 4-bit codes.
VARIANTS = [
    ("f32", 0, 0),
    ("f32", 0, 4),
    ("f16", 0, 0),
    ("f16", 5, 4),
    ("i8", 0, 0),
    ("i8", 5, 0),
    ("i8", 0, 4),
]


def _built(dtype: str, rerank: int, pq: int) -> IVFIndex:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, DIM)).astype(np.float32)
    ivf = IVFIndex(DIM, "ip", dtype, nlist=4, nprobe=2, rerank=rerank, pq=pq, train_threshold=0)
    ivf.add(np.arange(300), v)
    ivf.train(v)
    return ivf


# Run in a child process: on a build without the fix a truncated map kills it with SIGBUS.
_TRUNCATE_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_ivf_hardening import VARIANTS, _built, _every_read_fails
    from leanclip import IVFIndex
    from pathlib import Path
    d = Path({tmp!r})
    for dtype, rerank, pq in VARIANTS:
        for verify in (True, False):
            p = d / "t.ivf"
            _built(dtype, rerank, pq).save(p)
            ivf = IVFIndex.load(p, mmap=True, verify=verify)
            assert len(ivf.search(np.ones({dim}, np.float32), k=3)[0]) == 3
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 3)
            _every_read_fails(ivf, d, f"{{dtype}} {{rerank}} {{pq}} truncated")
    print("child done")
    """
)


def _every_read_fails(ivf: IVFIndex, tmp: Path, label: str) -> None:
    """Every call that reads the mapped file raises IndexFileError; save writes nothing."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal(DIM).astype(np.float32)
    batch = rng.standard_normal((20, DIM)).astype(np.float32)
    out = tmp / "copy.ivf"
    calls = {
        "search": lambda: ivf.search(q, k=3),
        "batch search": lambda: ivf.search(batch, k=3),
        "get": lambda: ivf.get([5]),
        "keys": lambda: ivf.keys(),
        "verify": lambda: ivf.verify(),
        "save": lambda: ivf.save(out),
    }
    for name, call in calls.items():
        with pytest.raises(IndexFileError, match="changed after it was opened"):
            call()
            raise AssertionError(f"{label}: {name} answered")
    assert not out.exists(), label
    assert len(ivf) == 300 and 5 in ivf  # held in memory: still answers


def test_a_mapped_ivf_file_truncated_later_raises_index_file_error(tmp_path: Path) -> None:
    code = _TRUNCATE_CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), dim=DIM)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"child died ({r.returncode}; -7 is SIGBUS):\n{r.stderr[-3000:]}"
    assert "child done" in r.stdout


@pytest.mark.parametrize(("dtype", "rerank", "pq"), VARIANTS)
def test_a_mapped_ivf_file_rewritten_in_place_raises(
    tmp_path: Path, dtype: str, rerank: int, pq: int
) -> None:
    p = tmp_path / "r.ivf"
    _built(dtype, rerank, pq).save(p)
    ivf = IVFIndex.load(p, mmap=True, verify=False)
    ivf.search(np.ones(DIM, np.float32), k=3)
    # Same size, other bytes in its second half (the data sections), written in place
    # through another descriptor; the mtime is set apart so a coarse clock cannot hide it.
    data = bytearray(p.read_bytes())
    half = len(data) // 2
    data[half:] = bytes(b ^ 0x5A for b in data[half:])
    with open(p, "r+b") as f:
        f.write(data)
    os.utime(p, ns=(0, 0))
    _every_read_fails(ivf, tmp_path, f"{dtype} {rerank} {pq} rewritten")


def test_scan_dims_at_large_dims_is_refused_before_allocating() -> None:
    # On a build without the bound the first batch allocates ~34 GB: only construction
    # and the setter are called here, which must refuse.
    with pytest.raises(ValueError, match=r"scan_dims needs dim <= 2048"):
        IVFIndex(65536, "cos", "i8", nlist=4, scan_dims=64)
    ivf = IVFIndex(65536, "cos", "i8", nlist=4)
    with pytest.raises(ValueError, match=r"scan_dims needs dim <= 2048"):
        ivf.scan_dims = 64
    assert ivf.scan_dims == 0
    IVFIndex(2048, "cos", "i8", nlist=4, scan_dims=64)  # at the bound: allowed


def _good(n: int = 40, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)


BAD_ROWS = [
    # (row, metrics where it is refused, message)
    (np.full(4, 1e-30, np.float32), ["cos"], "too small to normalize"),
    (np.array([3e38, 0, 0, 0], np.float32), ["cos", "ip", "l2"], "squared norm beyond"),
    (np.full(4, 1e38, np.float32), ["cos", "ip", "l2"], "squared norm beyond"),
]


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
def test_ivf_refuses_what_index_refuses_with_the_same_message(dtype: str, trained: bool) -> None:
    for row, metrics, why in BAD_ROWS:
        for metric in metrics:
            want = None
            with pytest.raises(ValueError, match=why) as exact:
                Index(4, metric, dtype).add([1], row[None])
            want = str(exact.value)
            ivf = IVFIndex(4, metric, dtype, nlist=4, train_threshold=0)
            ivf.add(np.arange(100, 140), _good())
            if trained:
                ivf.train(_good())
            for call in (
                lambda: ivf.add([1], row[None]),
                lambda: ivf.upsert([100], row[None]),
            ):
                with pytest.raises(ValueError) as got:
                    call()
                assert str(got.value) == want
            train_set = _good()
            train_set[0] = row
            with pytest.raises(ValueError, match=why):
                ivf.train(train_set)
            with pytest.raises(ValueError, match=r"queries\[0\]"):
                ivf.search(row, k=3)
            assert len(ivf) == 40
            ivf.retrain()
            # Nothing refused was stored: every query finds a stored key with a finite score.
            ids, scores = ivf.search(_good(3), k=5)
            assert np.isfinite(scores).all() and set(ids.ravel()) <= set(range(100, 140))


def test_train_under_cos_with_a_tiny_row_raises_value_error_not_a_panic() -> None:
    ivf = IVFIndex(4, "cos", "f32", nlist=4, train_threshold=0)
    rows = _good(64)
    rows[5] = 1e-30
    try:
        ivf.train(rows)
    except ValueError as e:
        assert "vectors[5]" in str(e)
    except BaseException as e:  # a PanicException is a BaseException
        pytest.fail(f"train raised {type(e).__name__}: {e}")
    else:
        pytest.fail("train accepted a row it cannot normalize")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nprobe": 2**70}, "nprobe must be at most"),
        ({"nlist": 2**70}, "nlist must be at most"),
        ({"rerank": 2**64}, "rerank must be at most"),
        ({"seed": -1}, "seed must be between 0 and 2\\*\\*64 - 1"),
        ({"seed": 2**64}, "seed must be between"),
        ({"train_threshold": -(2**70)}, "train_threshold must be at least 0"),
        ({"pq": 2**100}, "pq must be at most"),
        ({"shortlist": 2**70, "pq": 2}, "shortlist must be at most"),
        ({"scan_dims": -(2**65)}, "scan_dims must be at least 0"),
        ({"dim": 2**70}, "dim must be at most"),
    ],
)
def test_ivf_integer_arguments_out_of_range_raise_value_error(kwargs: dict, match: str) -> None:
    args = {"dim": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        IVFIndex(**args)


def test_ivf_setters_and_index_dim_out_of_range_raise_value_error() -> None:
    ivf = IVFIndex(8, nlist=4)
    for name in ("nprobe", "rerank", "shortlist", "scan_dims"):
        for value in (2**70, -(2**70)):
            with pytest.raises(ValueError, match=name):
                setattr(ivf, name, value)
    for dim in (2**70, -(2**70), 0):
        with pytest.raises(ValueError, match="dim must be"):
            Index(dim)
    with pytest.raises(TypeError):
        IVFIndex(8, nprobe=2.5)  # not an integer at all: a type error, as for any argument


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int8])
def test_integer_arrays_are_refused_as_vectors(dtype: type) -> None:
    v = np.ones((2, 4), dtype)
    for index in (Index(4, "ip"), IVFIndex(4, "ip", nlist=2)):
        with pytest.raises(ValueError, match=r"vectors must be float32 or float64, got dtype"):
            index.add([1, 2], v)
        with pytest.raises(ValueError, match=r"queries must be float32 or float64"):
            index.search(v[0], k=1)
        assert len(index) == 0
    # A Python list of numbers means what it says; an empty array has nothing to misread.
    exact = Index(2, "ip")
    exact.add([1], [[1, 2]])
    assert exact.get([1]).tolist() == [[1.0, 2.0]]
    exact.add([], np.zeros((0, 2), np.int64))
