"""leanclip.mine_hard_negatives (the Rust engine side): exactness, groups, padding, f16, errors."""

from __future__ import annotations

import numpy as np
import pytest

from leanclip import mine_hard_negatives
from tests._fixtures_index import reference_scores


def brute_force(queries, corpus, k, qg=None, cg=None, metric="ip"):
    """float64 reference: (indices, scores) best first, ties by ascending row, -1 padding."""
    scores, primary = reference_scores(metric, corpus, queries)
    nq, n = scores.shape
    missing = np.inf if metric == "l2" else -np.inf
    idx = np.full((nq, k), -1, np.int64)
    out = np.full((nq, k), missing)
    rows = np.arange(n)
    for i in range(nq):
        ok = rows if qg is None else rows[np.asarray(cg) != qg[i]]
        order = ok[np.lexsort((ok, primary[i, ok]))][:k]
        idx[i, : len(order)] = order
        out[i, : len(order)] = scores[i, order]
    return idx, out


@pytest.mark.parametrize("metric", ["ip", "cos", "l2"])
@pytest.mark.parametrize("nq", [1, 5, 300])
def test_mining_equals_numpy_brute_force(metric, nq):
    rng = np.random.default_rng(nq)
    queries = rng.standard_normal((nq, 33)).astype(np.float32)
    corpus = rng.standard_normal((2500, 33)).astype(np.float32)
    idx, scores = mine_hard_negatives(queries, corpus, 10, metric=metric)
    want_idx, want_scores = brute_force(queries, corpus, 10, metric=metric)
    assert idx.dtype == np.int64 and scores.dtype == np.float32 and idx.shape == (nq, 10)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)


def test_groups_are_skipped_like_coco_captions():
    rng = np.random.default_rng(3)
    images = rng.standard_normal((200, 16)).astype(np.float32)
    # five captions per image, close to their image: without groups they would be the top hits
    captions = np.repeat(images, 5, axis=0) + 0.05 * rng.standard_normal((1000, 16)).astype(np.float32)
    image_groups = np.arange(200)
    caption_groups = np.repeat(np.arange(200), 5)
    idx, scores = mine_hard_negatives(images, captions, 7, image_groups, caption_groups)
    want_idx, want_scores = brute_force(images, captions, 7, image_groups, caption_groups)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    assert not (caption_groups[idx] == image_groups[:, None]).any()
    # and the other direction, captions as queries
    idx, _ = mine_hard_negatives(captions, images, 3, caption_groups, image_groups, metric="cos")
    want_idx, _ = brute_force(captions, images, 3, caption_groups, image_groups, metric="cos")
    np.testing.assert_array_equal(idx, want_idx)


@pytest.mark.parametrize("metric,missing", [("ip", -np.inf), ("l2", np.inf)])
def test_k_larger_than_eligible_pads_with_minus_one(metric, missing):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    corpus = rng.standard_normal((6, 8)).astype(np.float32)
    qg = np.array([0, 1, 2, 9])
    cg = np.array([0, 0, 0, 1, 2, 2])  # query 0 has 3 eligible rows, query 3 all 6
    idx, scores = mine_hard_negatives(queries, corpus, 8, qg, cg, metric=metric)
    want_idx, want_scores = brute_force(queries, corpus, 8, qg, cg, metric=metric)
    np.testing.assert_array_equal(idx, want_idx)
    assert (idx[0, 3:] == -1).all() and (scores[0, 3:] == missing).all()
    assert (idx[3, 6:] == -1).all() and (idx[3, :6] >= 0).all()
    np.testing.assert_allclose(scores[idx >= 0], want_scores[want_idx >= 0], rtol=1e-4, atol=1e-4)
    # every row in the query's own group: nothing eligible
    idx, scores = mine_hard_negatives(queries[:1], corpus[:3], 2, [5], [5, 5, 5])
    assert idx.tolist() == [[-1, -1]] and np.isneginf(scores).all()


def test_ties_break_by_ascending_index():
    corpus = np.tile(np.array([[1.0, 2.0]], np.float32), (9, 1))
    corpus[4] = [2.0, 4.0]
    for queries in (np.array([[1.0, 1.0]], np.float32), np.ones((20, 2), np.float32)):
        idx, scores = mine_hard_negatives(queries, corpus, 4)
        assert (idx == [4, 0, 1, 2]).all()
        assert (scores[:, 1:] == 3.0).all()


def test_f16_inputs_match_f32_within_recall():
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((300, 128)).astype(np.float32)
    corpus = rng.standard_normal((5000, 128)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    groups_q, groups_c = np.arange(300) % 50, np.arange(5000) % 50
    want, _ = mine_hard_negatives(queries, corpus, 10, groups_q, groups_c)
    for q, c, dtype in [
        (queries.astype(np.float16), corpus.astype(np.float16), "f32"),
        (queries, corpus.astype(np.float16), "f32"),
        (queries, corpus, "f16"),
    ]:
        got, scores = mine_hard_negatives(q, c, 10, groups_q, groups_c, dtype=dtype)
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
        assert recall >= 0.999, (q.dtype, c.dtype, dtype, recall)
        # f16 inputs are scored exactly (f16 -> f32 is exact)
        if q.dtype == np.float16 and dtype == "f32":
            ref_idx, ref_scores = brute_force(q, c, 10, groups_q, groups_c)
            np.testing.assert_array_equal(got, ref_idx)
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    got, _ = mine_hard_negatives(queries, corpus, 10, groups_q, groups_c, dtype="i8")
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]) >= 0.97


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(queries=np.ones((2, 3)), corpus=np.ones((4, 2))), "corpus must have shape"),
        (dict(queries=np.ones(3), corpus=np.ones((4, 3))), "queries must have shape"),
        (dict(queries=[[1.0, np.nan, 0.0]], corpus=np.ones((4, 3))), r"queries\[0\].*NaN"),
        (dict(corpus=np.vstack([np.ones((2, 3)), [[0, np.inf, 0]]])), r"corpus\[2\]"),
        (dict(corpus=np.vstack([np.ones((2, 3)), [[0, 0, 0]]]), metric="cos"), "zero vector"),
        (dict(k=0), "k must be at least 1"),
        (dict(query_groups=[0, 1]), "together"),
        (dict(query_groups=[0], corpus_groups=[0, 1, 2, 3]), "query_groups must have length 2"),
        (dict(query_groups=[0, 1], corpus_groups=[0]), "corpus_groups must have length 4"),
        (dict(query_groups=[0.5, 1], corpus_groups=[0, 1, 2, 3]), "integers"),
        (dict(metric="dot"), "metric"),
        (dict(dtype="f64"), "dtype"),
        (dict(queries=[["a", "b", "c"]] * 2), "float"),
    ],
)
def test_bad_input_raises_valueerror(kwargs, message):
    args = dict(queries=np.ones((2, 3), np.float32), corpus=np.ones((4, 3), np.float32), k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(**args)


def test_float64_and_strided_inputs_are_accepted():
    rng = np.random.default_rng(2)
    big = rng.standard_normal((50, 20))
    idx, _ = mine_hard_negatives(big[:10, ::2], big[10:, ::2], 3)
    want, _ = brute_force(big[:10, ::2], big[10:, ::2], 3)
    np.testing.assert_array_equal(idx, want)


MEMORY_PROBE = """
import resource, sys, numpy as np
from leanclip import mine_hard_negatives
n = int(sys.argv[1])
rng = np.random.default_rng(0)
q = rng.standard_normal((n, 32), dtype=np.float32)
c = rng.standard_normal((n, 32), dtype=np.float32)
groups = np.arange(n) // 5
mine_hard_negatives(q[:10], c[:10], 2)  # load the extension and start the thread pool
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
idx, scores = mine_hard_negatives(q, c, 10, groups, groups)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert (idx >= 0).all()
print((after - before) / 1024)
"""


def test_mining_memory_stays_bounded_without_a_score_matrix():
    import subprocess
    import sys

    n = 20_000  # a q x n float32 score matrix would take 1,600 MB
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(n)], capture_output=True, text=True, check=True
    )
    extra_mb = float(out.stdout.strip())
    output_mb = n * 10 * 12 / 2**20  # int64 + float32 results
    assert extra_mb < output_mb + 100, f"mining grew peak RSS by {extra_mb:.0f} MB"
