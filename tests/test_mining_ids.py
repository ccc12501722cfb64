"""hard_negative_ids against a numpy brute force, and its input checks."""

from __future__ import annotations

import numpy as np
import pytest

import leanclip
from leanclip.mining import hard_negative_ids


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(queries, corpus, corpus_ids, k, qg=None, cg=None, positives=None):
    """Corpus ids of the top-k inner products per query, positives removed, ties by row, -1 pad."""
    s = queries.astype(np.float64) @ corpus.astype(np.float64).T
    eligible = np.ones(s.shape, dtype=bool)
    if qg is not None:
        eligible &= np.asarray(qg)[:, None] != np.asarray(cg)[None, :]
    if positives is not None:
        for i, pos in enumerate(positives):
            eligible[i] &= ~np.isin(corpus_ids, list(pos))
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for i in range(len(queries)):
        rows = np.nonzero(eligible[i])[0]
        rows = rows[np.lexsort((rows, -s[i, rows]))][:k]
        out[i, : len(rows)] = corpus_ids[rows]
    return out


def test_image_to_text_with_caption_groups_matches_numpy():
    # COCO-like: 60 images, 5 captions each; a caption's group is its image's id
    d, n_img = 48, 60
    img_ids = np.arange(1000, 1000 + n_img)
    cap_group = np.repeat(img_ids, 5)
    cap_ids = np.random.default_rng(1).permutation(10_000)[: n_img * 5]
    images, captions = _unit(n_img, d, 2), _unit(n_img * 5, d, 3)
    got = hard_negative_ids(img_ids, images, cap_ids, captions, 10, img_ids, cap_group)
    want = _brute(images, captions, cap_ids, 10, img_ids, cap_group)
    assert got.dtype == np.int64 and got.shape == (n_img, 10)
    np.testing.assert_array_equal(got, want)
    # no negative is a caption of the query image
    owner = dict(zip(cap_ids.tolist(), cap_group.tolist()))
    assert all(owner[c] != img for img, row in zip(img_ids, got) for c in row)
    # and text to image, the other direction
    got_t2i = hard_negative_ids(cap_ids, captions, img_ids, images, 7, cap_group, img_ids)
    np.testing.assert_array_equal(got_t2i, _brute(captions, images, img_ids, 7, cap_group, img_ids))


def test_without_groups_matches_numpy():
    q, c = _unit(40, 32, 4), _unit(500, 32, 5)
    cids = np.arange(500) * 2 + 1
    got = hard_negative_ids(np.arange(40), q, cids, c, 12)
    np.testing.assert_array_equal(got, _brute(q, c, cids, 12))


def test_k_beyond_eligible_rows_is_padded_with_minus_one():
    q, c = _unit(6, 16, 6), _unit(9, 16, 7)
    qg = np.array([0, 0, 1, 1, 2, 2])
    cg = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    got = hard_negative_ids(np.arange(6), q, np.arange(9) + 50, c, 8, qg, cg)
    assert got.shape == (6, 8)
    assert (got[:, 6:] == -1).all() and (got[:, :6] >= 50).all()  # 6 eligible rows per query
    np.testing.assert_array_equal(got, _brute(q, c, np.arange(9) + 50, 8, qg, cg))
    more = hard_negative_ids(np.arange(6), q, np.arange(9), c, 20)
    assert (more[:, :9] >= 0).all() and (more[:, 9:] == -1).all()


def test_explicit_positives_are_excluded():
    q, c = _unit(30, 24, 8), _unit(200, 24, 9)
    cids = np.arange(200) + 7
    rng = np.random.default_rng(10)
    # make the positives the nearest rows, so that excluding them matters
    nearest = np.argsort(-(q @ c.T), axis=1)[:, :3]
    positives = [set(cids[row].tolist()) | {int(rng.integers(7, 207))} for row in nearest]
    got = hard_negative_ids(np.arange(30), q, cids, c, 10, positives=positives)
    np.testing.assert_array_equal(got, _brute(q, c, cids, 10, positives=positives))
    assert all(not (set(row.tolist()) & pos) for row, pos in zip(got, positives))


def test_positives_with_repeated_corpus_ids():
    # ids repeat (e.g. a caption id space shared across rows): every row of a positive id goes
    q, c = _unit(10, 16, 16), _unit(60, 16, 17)
    cids = np.arange(60) % 12
    nearest = np.argsort(-(q @ c.T), axis=1)[:, 0]
    positives = [[int(cids[r])] for r in nearest]  # each such id covers 5 corpus rows
    got = hard_negative_ids(np.arange(10), q, cids, c, 8, positives=positives)
    np.testing.assert_array_equal(got, _brute(q, c, cids, 8, positives=positives))
    assert (got >= 0).all()


def test_mixed_float16_and_float32_inputs():
    q, c = _unit(20, 32, 18), _unit(400, 32, 19)
    got = hard_negative_ids(np.arange(20), q.astype(np.float16), np.arange(400), c, 5)
    want = _brute(q.astype(np.float16).astype(np.float32), c, np.arange(400), 5)
    np.testing.assert_array_equal(got, want)


def test_float16_embeddings_keep_recall():
    q, c = _unit(200, 64, 11), _unit(3000, 64, 12)
    cids = np.arange(3000)
    want = _brute(q, c, cids, 10)
    got = hard_negative_ids(np.arange(200), q.astype(np.float16), cids, c.astype(np.float16), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want.tolist())])
    assert recall >= 0.99


def test_same_answer_as_the_engine_rows():
    q, c = _unit(25, 32, 13), _unit(300, 32, 14)
    cids = np.random.default_rng(15).permutation(300) + 100
    rows, _ = leanclip.mine_hard_negatives(q, c, 5)
    got = hard_negative_ids(np.arange(25), q, cids, c, 5)
    np.testing.assert_array_equal(got, cids[rows])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(k=0), "k must be at least 1"),
        (dict(query_ids=np.arange(4)), r"query_ids must have shape \(5,\)"),
        (dict(corpus_ids=np.arange(20) - 1), "non-negative"),
        (dict(corpus_ids=np.arange(20) * 1.5), "integers"),
        (dict(corpus_embeddings=_unit(20, 9, 0)), r"shape \(n, 8\)"),
        (dict(query_embeddings=np.full((5, 8), np.nan, np.float32)), "NaN"),
        (dict(query_groups=np.zeros(5, np.int64)), "both query_groups and corpus_groups"),
        (dict(query_groups=np.zeros(5, np.int64), corpus_groups=np.zeros(3, np.int64)), r"\(20,\)"),
        (dict(positives=[[1]] * 4), "one entry per query"),
        (dict(metric="dot"), "unknown metric"),
        (dict(dtype="f64"), "unknown dtype"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = dict(
        query_ids=np.arange(5),
        query_embeddings=_unit(5, 8, 0),
        corpus_ids=np.arange(20),
        corpus_embeddings=_unit(20, 8, 1),
        k=3,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        hard_negative_ids(**args)


def test_low_precision_scan_gives_the_f32_ids_and_bad_precision_is_refused():
    # the i8 / bf16 scans re-score their candidates in f32: same ids as the f32 scan
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((20, 48)).astype(np.float32)
    corpus = centers[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 48)).astype(np.float32)
    queries = corpus[:64] + 0.05 * rng.standard_normal((64, 48)).astype(np.float32)
    groups = np.arange(2000) // 4
    args = (np.arange(64), queries, np.arange(2000), corpus, 10)
    want = hard_negative_ids(*args, query_groups=groups[:64], corpus_groups=groups)
    for precision in ("i8", "bf16"):
        got = hard_negative_ids(*args, query_groups=groups[:64], corpus_groups=groups, precision=precision)
        assert (got == want).mean() >= 0.999, precision
    with pytest.raises(ValueError, match="precision"):
        hard_negative_ids(*args, precision="f8")
