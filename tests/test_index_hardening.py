"""Issue 14, engine items: mapped files that change (truncated, rewritten in place, rewritten
while loading), files that are not regular files, vectors whose norms do not fit float32, keys
that were never added, and shapes that do not match. Crash-prone cases run in a subprocess so
that a SIGBUS is a failing test, not a dead pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import leanclip
from leanclip import Index, IndexFileError, IVFIndex, _engine
from leanclip.errors import LeanclipError
from leanclip.mining import hard_negative_ids

HEADER = 64


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # -7 is SIGBUS: the process crashed instead of raising IndexFileError
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def saved(path, n=3000, dim=64, first=0, metric="ip", dtype="f32"):
    rng = np.random.default_rng(first)
    index = Index(dim, metric, dtype)
    index.add(np.arange(first, first + n), rng.standard_normal((n, dim)))
    index.save(path)
    return index


# --- mapped files that change -------------------------------------------------------------


def test_truncated_after_mmap_raises_index_file_error_in_every_call(tmp_path):
    path = tmp_path / "t.lci"
    saved(path)
    out = run_child(
        """
        import os, sys
        import numpy as np
        from leanclip import Index, IndexFileError
        path = sys.argv[1]
        for verify in (True, False):
            index = Index.load(path, mmap=True, verify=verify)
            q = np.ones(64, np.float32)
            index.search(q, k=3)
            os.truncate(path, os.path.getsize(path) // 3)
            for call in (lambda: index.search(q, k=3), lambda: index.search(np.ones((20, 64)), k=3),
                         lambda: index.get([5]), lambda: index.astype("f16"), index.verify):
                try:
                    call()
                except IndexFileError as exc:
                    assert "changed after it was opened" in str(exc), exc
                else:
                    raise SystemExit("no IndexFileError")
            assert len(index.keys()) == 3000 and index.keys()[7] == 7  # read at load, intact
            src = Index(64, "ip")  # restore the file for the next round
            src.add(np.arange(3000), np.random.default_rng(0).standard_normal((3000, 64)))
            src.save(path)
        print("ok")
        """,
        str(path),
    )
    assert "ok" in out.stdout


def test_overwritten_in_place_never_returns_garbage_keys(tmp_path):
    path, other = tmp_path / "a.lci", tmp_path / "b.lci"
    saved(path, n=1000, dim=32, first=0)
    saved(other, n=1000, dim=32, first=10**6)  # same size, other keys
    out = run_child(
        """
        import sys, time
        import numpy as np
        from leanclip import Index, IndexFileError
        path, other = sys.argv[1], sys.argv[2]
        index = Index.load(path, mmap=True, verify=False)
        time.sleep(0.05)  # let the mtime clock tick
        data = open(other, "rb").read()
        with open(path, "r+b") as f:  # in place: same inode, same size
            f.write(data)
        assert index.keys().max() < 1000 and 999 in index
        try:
            index.search(np.ones(32), k=5)
        except IndexFileError as exc:
            assert "modified in place" in str(exc), exc
        else:
            raise SystemExit("no IndexFileError")
        print("ok")
        """,
        str(path),
        str(other),
    )
    assert "ok" in out.stdout


def test_loading_while_another_program_rewrites_the_file_never_crashes(tmp_path):
    path = tmp_path / "w.lci"
    saved(path)
    out = run_child(
        """
        import os, subprocess, sys
        import numpy as np
        from leanclip import Index, IndexFileError
        path = sys.argv[1]
        good = open(path, "rb").read()
        writer = subprocess.Popen([sys.executable, "-c", '''
        import sys
        path, good = sys.argv[1], open(sys.argv[1], "rb").read()
        i = 0
        while True:
            with open(path, "r+b") as f:
                f.truncate((i * 7919) % len(good))
                f.write(good[: (i * 104729) % len(good)])
            i += 1
        '''.replace("\\n        ", "\\n"), path])
        ok = refused = 0
        try:
            for i in range(300):
                try:
                    index = Index.load(path, mmap=True, verify=i % 2 == 0)
                except IndexFileError:
                    refused += 1
                    continue
                try:
                    index.search(np.ones((i % 12 + 1, 64)), k=3)
                except IndexFileError:
                    pass
                ok += 1
        finally:
            writer.kill()
            writer.wait()
        print("ok", ok, refused)
        """,
        str(path),
    )
    assert "ok" in out.stdout


def test_a_file_replaced_by_rename_keeps_serving_the_old_index(tmp_path):
    path = tmp_path / "r.lci"
    saved(path, n=500, dim=16)
    index = Index.load(path, mmap=True)
    saved(path, n=700, dim=16, first=10_000)  # what save() does: rename over
    keys, _ = index.search(np.ones(16), k=5)
    assert keys.max() < 500
    index.verify()
    assert len(Index.load(path, mmap=True)) == 700


# --- not a regular file ---------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])
def test_device_files_are_refused_before_reading(mmap):
    with pytest.raises(IndexFileError, match="not a regular file"):
        Index.load("/dev/zero", mmap=mmap)


def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = run_child(
        """
        import sys
        from leanclip import Index, IndexFileError
        for mmap in (False, True):
            try:
                Index.load(sys.argv[1], mmap=mmap)
            except IndexFileError as exc:
                assert "a FIFO" in str(exc), exc
        print("ok")
        """,
        str(fifo),
    )
    assert "ok" in out.stdout


def test_a_directory_is_still_an_is_a_directory_error(tmp_path):
    with pytest.raises(IsADirectoryError):
        Index.load(tmp_path)


# --- vectors that do not fit ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
def test_cos_refuses_vectors_and_queries_too_small_to_normalize(dtype):
    index = Index(8, "cos", dtype)
    index.add([1], np.ones((1, 8)))
    with pytest.raises(ValueError, match=r"vectors\[1\] has a squared norm below"):
        index.add([2, 3], np.stack([np.ones(8), np.full(8, 1e-30)]))
    assert len(index) == 1 and 2 not in index
    with pytest.raises(ValueError, match=r"queries\[0\] has a squared norm below"):
        index.search(np.full(8, 1e-30, np.float32), k=1)
    keys, scores = index.search(np.ones(8), k=5)
    assert keys.tolist() == [1] and np.isfinite(scores).all()
    assert np.isfinite(index.get([1])).all()


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_huge_vectors_are_refused_and_batch_matches_single(metric):
    index = Index(8, metric)
    with pytest.raises(ValueError, match=r"vectors\[0\] has a squared norm beyond"):
        index.add([1], np.full((1, 8), 3e38, np.float32))
    with pytest.raises(ValueError, match=r"queries\[0\] has a squared norm beyond"):
        index.search(np.full(8, 3e38, np.float32), k=1)
    big = np.float32(np.sqrt(np.finfo(np.float32).max / 4 / 8) * 0.999)
    rng = np.random.default_rng(1)
    data = np.sign(rng.standard_normal((40, 8))).astype(np.float32) * big
    index.add(np.arange(40), data)
    _, batch = index.search(-data, k=3)  # 40 queries: the batched path
    for q in range(40):
        _, single = index.search(-data[q], k=3)
        assert np.isfinite(batch[q]).all() and np.isfinite(single).all()
        np.testing.assert_allclose(batch[q], single, rtol=1e-3)


@pytest.mark.parametrize("make", [Index, lambda dim: IVFIndex(dim, nlist=2)], ids=["Index", "IVFIndex"])
def test_a_zero_row_array_of_another_dimension_is_refused(make):
    index = make(8)
    with pytest.raises(ValueError, match=r"shape \(0, 8\)"):
        index.add(np.array([], np.uint64), np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"shape \(0, 8\)"):
        index.upsert([], np.zeros((0, 3)))
    index.add([], np.zeros((0, 8)))
    index.add([], [])
    assert len(index) == 0


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_search_never_returns_a_key_that_was_not_added(tmp_path, metric, value):
    index = Index(4, metric)
    index.add([10, 20, 30, 40], np.random.default_rng(2).standard_normal((4, 4)))
    path = tmp_path / "c.lci"
    index.save(path)
    data = bytearray(path.read_bytes())
    start = 128  # 64-byte header + 32 bytes of keys, padded to 64
    vec = np.frombuffer(bytes(data[start:]), np.float32).copy()
    vec[[0, 5, 9]] = value
    data[start:] = vec.tobytes()
    _fix_checksums(data, start)
    path.write_bytes(bytes(data))
    crafted = Index.load(path)
    for q in (np.ones(4), np.ones((9, 4))):
        keys, _ = crafted.search(q, k=4)
        assert set(np.unique(keys).tolist()) <= {10, 20, 30, 40}
        for row in np.atleast_2d(keys):
            assert sorted(row.tolist()) == [10, 20, 30, 40]
    keys, _ = crafted.search(np.ones(4), k=4, exclude=[20])
    assert sorted(keys.tolist()) == [10, 30, 40]


def _xxh3(b: bytes) -> int:
    # the system libxxhash computes the format's XXH3-64 (as in test_fuzz_files.py)
    import ctypes

    f = ctypes.CDLL("libxxhash.so.0").XXH3_64bits
    f.restype, f.argtypes = ctypes.c_uint64, [ctypes.c_char_p, ctypes.c_size_t]
    return f(b, len(b))


def _fix_checksums(data: bytearray, vectors_start: int) -> None:
    data[48:56] = _xxh3(bytes(data[vectors_start:])).to_bytes(8, "little")
    meta = bytes(data[:56]) + bytes(data[64:vectors_start])
    data[56:64] = _xxh3(meta).to_bytes(8, "little")


# --- issue 13 items exposed in Python -------------------------------------------------------


def test_index_file_error_is_a_leanclip_error_everywhere():
    assert issubclass(IndexFileError, LeanclipError) and issubclass(IndexFileError, Exception)
    assert leanclip.IndexFileError is _engine.IndexFileError is IndexFileError


def test_dtype_and_metric_lists_come_from_the_engine():
    from leanclip import _validate

    assert _engine.DTYPES == ("f32", "f16", "i8") and _engine.METRICS == ("cos", "ip", "l2")
    assert _validate.DTYPES is _engine.DTYPES and _validate.METRICS is _engine.METRICS
    for d in _engine.DTYPES:
        assert Index(3, "ip", d).dtype == d
    with pytest.raises(ValueError, match='expected one of "f32", "f16", "i8"'):
        _validate.check_dtype("f64")


@pytest.mark.parametrize("mmap", [False, True])
def test_astype_converts_keeping_keys_order_and_metric(tmp_path, mmap):
    src = Index(16, "ip")
    rng = np.random.default_rng(3)
    src.add(np.arange(300) * 7 + 3, rng.standard_normal((300, 16)))
    src.remove([3, 10])
    src.save(tmp_path / "s.lci")
    src = Index.load(tmp_path / "s.lci", mmap=mmap)
    for dtype, tol in (("f32", 0), ("f16", 1e-2), ("i8", 5e-2)):
        out = src.astype(dtype)
        assert (out.dim, out.metric, out.dtype, out.read_only) == (16, "ip", dtype, False)
        np.testing.assert_array_equal(out.keys(), src.keys())
        np.testing.assert_allclose(out.get(src.keys()), src.get(src.keys()), atol=tol)
    big = Index(4, "l2")
    big.add([5], np.full((1, 4), 1e5))
    with pytest.raises(ValueError, match="key 5 .*float16"):
        big.astype("f16")
    with pytest.raises(ValueError, match="unknown dtype"):
        big.astype("f64")


def test_hard_negative_ids_leaves_the_value_checks_to_the_engine():
    q = np.ones((3, 4), np.float32)
    c = np.ones((5, 4), np.float32)
    c[2, 1] = np.nan
    # the engine's message (rows named as the engine's arguments), checked once
    with pytest.raises(ValueError, match=r"corpus\[2\] contains NaN"):
        hard_negative_ids(np.arange(3), q, np.arange(5), c, 2)
    with pytest.raises(ValueError, match=r"queries\[0\] contains NaN"):
        hard_negative_ids(np.arange(1), np.full((1, 4), np.inf), np.arange(0), np.zeros((0, 4)), 2)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_f16_batches_keep_single_query_results_on_tie_heavy_data(metric: str) -> None:
    """Issue 25 item 8: rows of {0, 0.5, 1} put thousands of rows at a few distances; a batch
    of 8 or more queries (the matrix-product path) must return each query's single-query ids
    and score bits. Keys run against row order, so a tie broken by row would show."""
    rng = np.random.default_rng(11)
    rows = (rng.integers(0, 3, (3000, 16)) * 0.5).astype(np.float32)
    rows[np.all(rows == 0, axis=1)] = 0.5  # no zero rows under cos
    queries = (rng.integers(0, 3, (12, 16)) * 0.5 + 0.25).astype(np.float32)
    index = Index(16, metric, "f16")
    index.add(np.arange(3000, 0, -1), rows)
    ids, scores = index.search(queries, k=10)
    for i, q in enumerate(queries):
        one_ids, one_scores = index.search(q, k=10)
        np.testing.assert_array_equal(ids[i], one_ids, err_msg=f"query {i}")
        np.testing.assert_array_equal(scores[i].view(np.uint32), one_scores.view(np.uint32))
