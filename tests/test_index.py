"""leanclip.Index: API contract, exactness against numpy, recall of f16/i8, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import leanclip
from leanclip import Index
from tests._fixtures_index import reference_scores

METRICS = ["cos", "ip", "l2"]
DTYPES = ["f32", "f16", "i8"]


def brute_force(metric, keys, data, queries, k, exclude=()):
    """Reference top-k in float64: (keys, scores) best first, ties by ascending key."""
    scores, primary = reference_scores(metric, data, queries)
    keep = ~np.isin(keys, np.asarray(list(exclude), dtype=np.uint64))
    keys, scores, primary = keys[keep], scores[:, keep], primary[:, keep]
    out_k, out_s = [], []
    for row_primary, row_scores in zip(primary, scores):
        order = np.lexsort((keys, row_primary))[:k]
        out_k.append(keys[order])
        out_s.append(row_scores[order])
    return np.array(out_k, dtype=np.uint64), np.array(out_s)


def random_index(metric="cos", dtype="f32", n=2000, dim=37, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, dim)).astype(np.float32)
    keys = rng.choice(10**12, size=n, replace=False).astype(np.uint64)
    index = Index(dim, metric=metric, dtype=dtype)
    index.add(keys, data)
    return index, keys, data, rng


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 3, 40])  # per-row kernels below 8 queries, blocked GEMM above
def test_f32_search_equals_numpy_brute_force(metric, nq):
    index, keys, data, rng = random_index(metric, n=3000, dim=37, seed=nq)
    queries = rng.standard_normal((nq, 37)).astype(np.float32)
    got_k, got_s = index.search(queries, k=10)
    want_k, want_s = brute_force(metric, keys, data, queries, 10)
    assert got_k.dtype == np.uint64 and got_s.dtype == np.float32
    assert got_k.shape == got_s.shape == (nq, 10)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_exclude_and_k_larger_than_index(metric):
    index, keys, data, rng = random_index(metric, n=50, dim=8)
    queries = rng.standard_normal((9, 8)).astype(np.float32)
    excluded = [int(keys[3]), int(keys[10]), 123]  # 123 is absent: ignored
    got_k, got_s = index.search(queries, k=100, exclude=excluded)
    want_k, want_s = brute_force(metric, keys, data, queries, 100, exclude=excluded)
    assert got_k.shape == (9, 48)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)


def test_equal_scores_are_ordered_by_ascending_key():
    index = Index(4, metric="ip")
    vec = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    keys = [50, 7, 900, 3, 12]
    index.add(keys, np.tile(vec, (5, 1)))
    index.add([1000], [vec * 2])
    got_k, got_s = index.search(vec, k=6)
    assert got_k.tolist() == [1000, 3, 7, 12, 50, 900]
    assert got_s[1:].tolist() == [30.0] * 5
    # the batched (GEMM) path orders ties the same way
    got_k, _ = index.search(np.tile(vec, (20, 1)), k=6)
    assert (got_k == np.array([1000, 3, 7, 12, 50, 900], np.uint64)).all()


def test_single_query_gives_1d_results_and_empty_index_gives_empty_arrays():
    index = Index(3)
    keys, scores = index.search([1.0, 0.0, 0.0], k=5)
    assert keys.shape == (0,) and scores.shape == (0,) and keys.dtype == np.uint64
    keys, scores = index.search(np.ones((4, 3)), k=5)
    assert keys.shape == (4, 0) and scores.dtype == np.float32
    index.add([1, 2], [[1, 0, 0], [0, 1, 0]])
    keys, scores = index.search([1.0, 0.0, 0.0], k=5)
    assert keys.tolist() == [1, 2]
    np.testing.assert_allclose(scores, [1.0, 0.0], atol=1e-7)


def test_cos_scores_are_cosines_and_l2_lowest_first():
    cos = Index(2, "cos")
    cos.add([1, 2], [[3.0, 4.0], [-1.0, 0.0]])
    keys, scores = cos.search([6.0, 8.0])
    assert keys.tolist() == [1, 2]
    np.testing.assert_allclose(scores, [1.0, -0.6], atol=1e-6)
    l2 = Index(2, "l2")
    l2.add([1, 2], [[3.0, 4.0], [1.0, 1.0]])
    keys, scores = l2.search([1.0, 2.0])
    assert keys.tolist() == [2, 1]
    np.testing.assert_allclose(scores, [1.0, 8.0], atol=1e-6)


def _unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype,floor", [("f16", 0.999), ("i8", 0.98)])
def test_recall_at_10_of_quantized_storage(dtype, floor):
    rng = np.random.default_rng(42)
    data, queries = _unit(rng, 20000, 512), _unit(rng, 200, 512)
    keys = np.arange(20000, dtype=np.uint64)
    exact, quant = Index(512, "ip", "f32"), Index(512, "ip", dtype)
    exact.add(keys, data)
    quant.add(keys, data)
    want, _ = exact.search(queries, k=10)
    by_kernel = np.concatenate([quant.search(queries[i : i + 4], k=10)[0] for i in range(0, 200, 4)])
    by_gemm, _ = quant.search(queries, k=10)
    for path, got in (("kernel", by_kernel), ("gemm", by_gemm)):
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
        assert recall >= floor, (dtype, path, recall)


# ---------------------------------------------------------------------------------------------
# the key-value API


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_get_upsert_remove_roundtrip(dtype):
    index = Index(3, metric="ip", dtype=dtype)
    assert (index.dim, index.metric, index.dtype, len(index)) == (3, "ip", dtype, 0)
    index.add(np.array([5, 6, 7]), np.array([[1, 2, 3], [4, 5, 6], [-1, 0, 0.5]], np.float64))
    assert len(index) == 3 and 6 in index and 8 not in index and -1 not in index and "x" not in index
    assert sorted(index.keys().tolist()) == [5, 6, 7] and index.keys().dtype == np.uint64
    tol = {"f32": 0, "f16": 2e-3, "i8": 3e-2}[dtype]
    np.testing.assert_allclose(index.get([7, 5]), [[-1, 0, 0.5], [1, 2, 3]], atol=tol * 6)
    index.upsert([6, 9], [[0, 0, 1], [2, 2, 2]])
    assert len(index) == 4
    np.testing.assert_allclose(index.get([6, 9]), [[0, 0, 1], [2, 2, 2]], atol=tol * 2)
    assert index.remove([5, 5, 100]) == 1
    assert len(index) == 3 and 5 not in index
    assert sorted(index.keys().tolist()) == [6, 7, 9]
    np.testing.assert_allclose(index.get([9, 7]), [[2, 2, 2], [-1, 0, 0.5]], atol=tol * 2)
    keys, scores = index.search([0, 0, 1.0], k=3)
    assert keys.tolist() == [9, 6, 7]
    np.testing.assert_allclose(scores, [2, 1, 0.5], atol=tol * 2)


def test_cos_get_returns_unit_vectors():
    index = Index(2, "cos")
    index.add([1], [[3.0, 4.0]])
    np.testing.assert_allclose(index.get([1]), [[0.6, 0.8]], rtol=1e-6)


def test_large_keys_and_python_ints():
    index = Index(2, "ip")
    big = 2**64 - 1
    index.add([big, 0], [[1, 0], [0, 1]])
    assert big in index and 0 in index
    assert index.search([1.0, 0.0], k=1)[0].tolist() == [big]
    assert index.remove([big]) == 1


def test_add_rejects_present_key_with_keyerror_and_adds_nothing():
    index = Index(2, "ip")
    index.add([1, 2], [[1, 0], [0, 1]])
    with pytest.raises(KeyError, match="2"):
        index.add([3, 2], [[1, 1], [2, 2]])
    assert len(index) == 2 and 3 not in index


def test_repeated_key_in_batch_is_valueerror_for_add_and_upsert():
    index = Index(2, "ip")
    for method in (index.add, index.upsert):
        with pytest.raises(ValueError, match="more than once"):
            method([4, 4], [[1, 0], [0, 1]])
    assert len(index) == 0


def test_get_absent_key_is_keyerror():
    index = Index(2, "ip")
    index.add([1], [[1, 0]])
    with pytest.raises(KeyError, match="77"):
        index.get([1, 77])


def test_non_contiguous_and_float64_inputs_are_accepted():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((10, 8))
    index = Index(4, "ip")
    index.add(np.arange(10)[::-1], big[:, ::2])  # float64, strided
    np.testing.assert_allclose(index.get([9]), big[:1, ::2].astype(np.float32))
    keys, _ = index.search(big[::3, ::2], k=2)
    assert keys.shape == (4, 2)


def test_removal_keeps_search_exact():
    index, keys, data, rng = random_index("l2", n=500, dim=16)
    gone = keys[::3]
    assert index.remove(gone) == len(gone)
    keep = ~np.isin(keys, gone)
    queries = rng.standard_normal((12, 16)).astype(np.float32)
    got_k, _ = index.search(queries, k=7)
    want_k, _ = brute_force("l2", keys[keep], data[keep], queries, 7)
    np.testing.assert_array_equal(got_k, want_k)


# ---------------------------------------------------------------------------------------------
# bad input: a clear ValueError naming the problem, and nothing changes


def _bad_add_cases():
    return [
        ([1], [[1.0, 2.0]], "shape"),
        ([1, 2], [[1.0, 2.0, 3.0]], "shape"),
        ([1], [[1.0, np.nan, 0.0]], "NaN"),
        ([1], [[1.0, np.inf, 0.0]], "NaN or inf"),
        ([1], [[0.0, 0.0, 0.0]], "zero vector"),
        ([-1], [[1.0, 2.0, 3.0]], "non-negative"),
        ([1.5], [[1.0, 2.0, 3.0]], "integers"),
        ([[1]], [[1.0, 2.0, 3.0]], "1-D"),
        ([2**64], [[1.0, 2.0, 3.0]], "uint64"),
        ([1], [["a", "b", "c"]], "float"),
    ]


@pytest.mark.parametrize("keys,vectors,message", _bad_add_cases())
@pytest.mark.parametrize("method", ["add", "upsert"])
def test_bad_vectors_or_keys_raise_valueerror_and_change_nothing(keys, vectors, message, method):
    index = Index(3, "cos")
    index.add([10], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=message):
        getattr(index, method)(keys, vectors)
    assert len(index) == 1 and index.keys().tolist() == [10]
    np.testing.assert_allclose(index.get([10]), [[3**-0.5] * 3], rtol=1e-6)


def test_zero_vectors_are_fine_under_ip_and_l2():
    for metric in ("ip", "l2"):
        index = Index(2, metric, "i8")
        index.add([1], [[0.0, 0.0]])
        assert index.search([0.0, 0.0], k=1)[0].tolist() == [1]


def test_f16_range_is_checked():
    index = Index(2, "ip", "f16")
    with pytest.raises(ValueError, match="float16"):
        index.add([1], [[1e6, 0.0]])
    assert len(index) == 0


@pytest.mark.parametrize(
    "query,k,message",
    [
        ([1.0, 2.0], 1, "shape"),
        ([[1.0, 2.0, 3.0, 4.0]], 1, "shape"),
        (np.zeros((2, 2, 3)), 1, "shape"),
        ([1.0, np.nan, 2.0], 1, "NaN"),
        ([[1.0, 2.0, 3.0], [np.inf, 0, 0]], 1, r"queries\[1\]"),
        ([0.0, 0.0, 0.0], 1, "zero vector"),
        ([1.0, 2.0, 3.0], 0, "k must be at least 1"),
        ([1.0, 2.0, 3.0], -3, "k must be at least 1"),
    ],
)
def test_bad_search_raises_valueerror(query, k, message):
    index = Index(3, "cos")
    index.add([1], [[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=message):
        index.search(query, k=k)


def test_bad_exclude_raises_valueerror():
    index = Index(3, "cos")
    index.add([1], [[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="exclude"):
        index.search([1.0, 0, 0], exclude=[-4])


@pytest.mark.parametrize(
    "args,message",
    [
        ((0,), "dim"),
        ((-3,), "dim"),
        ((4, "dot"), "metric.*cos"),
        ((4, "cos", "f64"), "dtype.*f32"),
    ],
)
def test_bad_constructor_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        Index(*args)


def test_package_exports():
    assert leanclip.Index is Index
    assert issubclass(leanclip.IndexFileError, Exception)
    assert callable(leanclip.mine_hard_negatives)
    assert "Index(dim=3" in repr(Index(3))


@pytest.mark.slow
def test_typed_stub_matches_the_compiled_module():
    import subprocess
    import sys

    pytest.importorskip("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "leanclip._engine"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-2000:]
