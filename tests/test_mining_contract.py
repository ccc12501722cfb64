"""Issue 25, mining items: which scores mining reports (those of an ``Index`` of its dtype,
searched one query at a time, whatever the scan precision), ``hard_negative_ids`` with a huge
k, and corpus ids that repeat."""

from __future__ import annotations

import numpy as np
import pytest

from leanclip import Index, hard_negative_ids
from leanclip._engine import mine_hard_negatives


def _data(nq: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((20, dim)).astype(np.float32)
    corpus = centers[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    queries = centers[rng.integers(0, 20, nq)] + 0.3 * rng.standard_normal((nq, dim)).astype(np.float32)
    return queries.astype(np.float32), corpus.astype(np.float32)


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
@pytest.mark.parametrize("dtype", ["i8", "f16"])
def test_mining_scores_are_an_index_of_its_dtype_at_every_precision(metric: str, dtype: str) -> None:
    queries, corpus = _data(50, 3000, 64)
    k = 10
    index = Index(64, metric, dtype)
    index.add(np.arange(len(corpus)), corpus)
    want_ids = np.empty((len(queries), k), np.int64)
    want_scores = np.empty((len(queries), k), np.float32)
    for i, q in enumerate(queries):  # one query at a time: the reference
        ids, scores = index.search(q, k=k)
        want_ids[i], want_scores[i] = ids, scores
    for precision in ("f32", "bf16", "i8"):
        ids, scores = mine_hard_negatives(queries, corpus, k, metric=metric, dtype=dtype, precision=precision)
        np.testing.assert_array_equal(ids, want_ids, err_msg=precision)
        # bit for bit: the same kernels score the same stored rows
        np.testing.assert_array_equal(scores.view(np.uint32), want_scores.view(np.uint32), err_msg=precision)


def test_hard_negative_ids_with_a_huge_k_is_a_value_error() -> None:
    queries, corpus = _data(3, 20, 8)
    with pytest.raises(ValueError, match=r"k = 1099511627776 is too large"):
        hard_negative_ids(np.arange(3), queries, np.arange(20), corpus, k=2**40)
    with pytest.raises(ValueError, match="too large"):
        hard_negative_ids(np.arange(3), queries, np.arange(20), corpus, k=2**62)


def test_a_corpus_id_carried_by_several_rows_is_returned_once_per_row() -> None:
    # Contract (docs in hard_negative_ids): ids come per corpus row. Five rows carry id 7 and
    # are the five nearest to the query: id 7 fills five slots, then the next rows' ids follow.
    dim = 4
    query = np.array([[1.0, 0, 0, 0]], np.float32)
    near = np.array([[1.0, 0.01 * i, 0, 0] for i in range(5)], np.float32)
    far = np.array([[0.5, 1.0 + i, 0, 0] for i in range(5)], np.float32)
    corpus = np.vstack([near, far])
    ids = np.array([7, 7, 7, 7, 7, 1, 2, 3, 4, 5])
    out = hard_negative_ids([0], query, ids, corpus, k=7, metric="cos")
    assert out.tolist() == [[7, 7, 7, 7, 7, 1, 2]]
    # A positive id removes every row that carries it, and the list is refilled.
    out = hard_negative_ids([0], query, ids, corpus, k=4, metric="cos", positives=[{7}])
    assert out.tolist() == [[1, 2, 3, 4]]
    assert dim == corpus.shape[1]
