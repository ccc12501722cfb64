"""Micro-benchmarks of leanclip and the installed peers (faiss, usearch, hnswlib, numpy):
add, search Q=1 and Q=1000, mining, load. ``pytest benchmarks --benchmark-only`` times them;
``--benchmark-autosave`` / ``--benchmark-json=PATH`` keep the numbers to compare versions
(``pytest-benchmark compare``). Peers that are not installed are skipped, by name."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.micro.conftest import DIM, K, exact_topk, recall

DTYPES = ["f32", "f16", "i8"]
# The recall each storage keeps against exact f32 (the index's documented accuracy).
MIN_RECALL = {"f32": 0.99, "f16": 0.99, "i8": 0.95}


def _leanclip_index(corpus: np.ndarray, dtype: str):
    import leanclip

    index = leanclip.Index(DIM, metric="ip", dtype=dtype)
    index.add(np.arange(len(corpus), dtype=np.uint64), corpus)
    return index


def _peer(name: str, corpus: np.ndarray):
    """search(queries) -> (q, K) row ids, for an installed peer (skips where it is missing)."""
    if name == "numpy":

        def search(q):
            s = q @ corpus.T
            top = np.argpartition(-s, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
            return np.take_along_axis(top, order, 1)

        return search
    if name == "faiss":
        faiss = pytest.importorskip("faiss")
        flat = faiss.IndexFlatIP(DIM)
        flat.add(corpus)
        return lambda q: flat.search(q, K)[1]
    if name == "usearch":
        usearch_index = pytest.importorskip("usearch.index")
        return lambda q: usearch_index.search(corpus, q, K, usearch_index.MetricKind.IP, exact=True).keys
    if name == "hnswlib":
        hnswlib = pytest.importorskip("hnswlib")
        bf = hnswlib.BFIndex(space="ip", dim=DIM)
        bf.init_index(max_elements=len(corpus))
        bf.add_items(corpus, np.arange(len(corpus)))
        return lambda q: bf.knn_query(q, k=K)[0]
    raise ValueError(name)


PEERS = ["numpy", "faiss", "usearch", "hnswlib"]


# ----------------------------------------------------------------------------------- add


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_leanclip(benchmark, data, dtype):
    import leanclip

    corpus = data["corpus"]
    keys = np.arange(len(corpus), dtype=np.uint64)
    benchmark.group = "add"

    def add():
        index = leanclip.Index(DIM, metric="ip", dtype=dtype)
        index.add(keys, corpus)
        return index

    index = benchmark(add)
    assert len(index) == len(corpus)


def test_add_faiss(benchmark, data):
    faiss = pytest.importorskip("faiss")
    benchmark.group = "add"

    def add():
        flat = faiss.IndexFlatIP(DIM)
        flat.add(data["corpus"])
        return flat

    assert benchmark(add).ntotal == len(data["corpus"])


def test_add_hnswlib_bf(benchmark, data):
    hnswlib = pytest.importorskip("hnswlib")
    benchmark.group = "add"
    corpus = data["corpus"]

    def add():
        bf = hnswlib.BFIndex(space="ip", dim=DIM)
        bf.init_index(max_elements=len(corpus))
        bf.add_items(corpus, np.arange(len(corpus)))
        return bf

    assert benchmark(add).get_current_count() == len(corpus)


# ----------------------------------------------------------------------------------- search


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, "Q"])
def test_search_leanclip(benchmark, data, dtype, batch):
    index = _leanclip_index(data["corpus"], dtype)
    queries = data["queries"][:1] if batch == 1 else data["queries"]
    benchmark.group = f"search Q={len(queries)}"
    keys, _ = benchmark(index.search, queries, K)
    got = np.asarray(keys, dtype=np.int64).reshape(len(queries), -1)[:100]
    assert recall(got, data["truth"][: len(got)]) >= MIN_RECALL[dtype]


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("batch", [1, "Q"])
def test_search_peer(benchmark, data, peer, batch):
    search = _peer(peer, data["corpus"])
    queries = data["queries"][:1] if batch == 1 else data["queries"]
    benchmark.group = f"search Q={len(queries)}"
    got = np.asarray(benchmark(search, queries), dtype=np.int64).reshape(len(queries), -1)[:100]
    assert recall(got, data["truth"][: len(got)]) >= 0.99


# ----------------------------------------------------------------------------------- mining


@pytest.mark.parametrize("precision", ["f32", "i8", "bf16"])
def test_mining_leanclip(benchmark, mining_data, precision):
    import leanclip

    x, groups = mining_data
    benchmark.group = "mining"
    rows, scores = benchmark(
        leanclip.mine_hard_negatives, x, x, K, groups, groups, metric="ip", precision=precision
    )
    # exact re-score: the scores are the f32 inner products of the rows returned
    want = np.einsum("ij,ikj->ik", x[:50], x[rows[:50]])
    np.testing.assert_allclose(scores[:50], want, atol=1e-5)
    assert not np.any(groups[rows[:50]] == groups[:50, None])


def test_mining_faiss(benchmark, mining_data):
    faiss = pytest.importorskip("faiss")
    x, groups = mining_data
    benchmark.group = "mining"

    def mine():
        flat = faiss.IndexFlatIP(DIM)
        flat.add(x)
        _, idx = flat.search(x, K + 5)  # a group holds 5 rows: k + 5 leaves k eligible
        same = groups[np.maximum(idx, 0)] == groups[:, None]
        keep = np.argsort(same, axis=1, kind="stable")[:, :K]
        return np.take_along_axis(idx, keep, axis=1)

    rows = benchmark(mine)
    assert not np.any(groups[rows[:50]] == groups[:50, None])


def test_mining_numpy(benchmark, mining_data):
    x, groups = mining_data
    benchmark.group = "mining"

    def mine():
        out = np.empty((len(x), K), dtype=np.int64)
        for s in range(0, len(x), 1024):
            sc = x[s : s + 1024] @ x.T
            sc[groups[s : s + 1024, None] == groups[None, :]] = -np.inf
            part = np.argpartition(-sc, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1)
            out[s : s + 1024] = np.take_along_axis(part, order, 1)
        return out

    rows = benchmark(mine)
    sc = x[:20].astype(np.float64) @ x.T.astype(np.float64)
    sc[groups[:20, None] == groups[None, :]] = -np.inf
    assert recall(rows[:20], np.argsort(-sc, axis=1)[:, :K]) >= 0.99


# ----------------------------------------------------------------------------------- load


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_load_leanclip(benchmark, data, tmp_path, dtype, mmap):
    import leanclip

    path = tmp_path / f"{dtype}.lcx"
    _leanclip_index(data["corpus"], dtype).save(path)
    benchmark.group = "load"
    index = benchmark(leanclip.Index.load, path, mmap=mmap)
    assert len(index) == len(data["corpus"])
    keys, _ = index.search(data["queries"][:20], K)
    assert recall(np.asarray(keys, dtype=np.int64), data["truth"][:20]) >= MIN_RECALL[dtype]


def test_load_faiss(benchmark, data, tmp_path):
    faiss = pytest.importorskip("faiss")
    flat = faiss.IndexFlatIP(DIM)
    flat.add(data["corpus"])
    path = str(tmp_path / "flat.faiss")
    faiss.write_index(flat, path)
    benchmark.group = "load"
    assert benchmark(faiss.read_index, path).ntotal == len(data["corpus"])


def test_exact_topk_helper_is_exact():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, DIM)).astype(np.float32)
    top = exact_topk(x[:3], x, 1)
    assert top[:, 0].tolist() == [int(np.argmax(x[i] @ x.T)) for i in range(3)]
