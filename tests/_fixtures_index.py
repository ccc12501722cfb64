"""Fixtures for the Index, IVFIndex and mining tests: the float64 reference scores, the exact
top k and recall@k an approximate index is measured by, and the check that two indexes (one
saved and loaded, say) hold the same thing."""

from __future__ import annotations

import numpy as np


def reference_scores(metric, stored, queries):
    """Every query against every stored row in float64 (rows and queries unit-normalized under
    cos): (scores, primary), where ascending ``primary`` puts the best first."""
    stored = np.asarray(stored, np.float64)
    queries = np.asarray(queries, np.float64)
    if metric == "cos":
        stored = stored / np.linalg.norm(stored, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        scores = ((queries[:, None, :] - stored[None, :, :]) ** 2).sum(-1)
        return scores, scores
    scores = queries @ stored.T
    return scores, -scores


def assert_same_contents(a, b, rng):
    """Same dim, metric, dtype, keys and stored vectors, and the same results, bit for bit, for
    a single query and a batch."""
    assert (a.dim, a.metric, a.dtype, len(a)) == (b.dim, b.metric, b.dtype, len(b))
    assert a.keys().tolist() == b.keys().tolist()
    np.testing.assert_array_equal(a.get(a.keys()), b.get(a.keys()))
    queries = rng.standard_normal((9, a.dim))
    for qs in (queries[0], queries):
        ka, sa = a.search(qs, k=7)
        kb, sb = b.search(qs, k=7)
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(sa, sb)


def exact_top(base: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """The exact index's top ``k`` keys (row numbers) of each query, under ip."""
    from leanclip import Index

    ex = Index(base.shape[1], "ip")
    ex.add(np.arange(len(base), dtype=np.uint64), base)
    return ex.search(queries, k=k)[0]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall of each row of ``found`` against the same row of ``truth``."""
    return float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(found, truth)]))
