"""The measuring code of benchmarks/bench_starter_ideas.py (issue 30's second round): the
query-side mappings, the weighted gloss rows and the overall choice on the tuning set alone."""

from __future__ import annotations

import numpy as np

from benchmarks import bench_starter_ideas as B


def _m(t1: float, mrr: float, h1: float) -> dict:
    return {"tuning": {"r1": t1, "r5": 1.0, "mrr": mrr}, "held-out": {"r1": h1, "r5": 1.0, "mrr": 0.5}}


def test_the_overall_pick_looks_at_the_tuning_set_alone_and_needs_to_beat_the_baseline() -> None:
    rows = [
        ("baseline", "recipe 2", _m(0.9, 0.95, 0.5)),
        ("a", "ties the baseline", _m(0.9, 0.95, 0.99)),  # a tie keeps the baseline
        ("b", "best held-out", _m(0.8, 0.99, 1.0)),
    ]
    assert B.overall_pick(rows)[1] == "recipe 2"
    rows.append(("c", "better MRR", _m(0.9, 0.96, 0.1)))  # picked although its held-out is worst
    rows.append(("d", "same MRR, later", _m(0.9, 0.96, 0.9)))
    assert B.overall_pick(rows)[1] == "better MRR"


def test_weighted_rows_mix_unit_rows_and_renormalise() -> None:
    name = np.array([[3.0, 0.0], [0.0, 2.0]])
    gloss = np.array([[0.0, 5.0], [0.0, 1.0]])
    rows = B.weighted_rows(name, gloss, 0.2)
    want = np.array([[0.8, 0.2], [0.0, 1.0]])
    assert np.allclose(rows, want / np.linalg.norm(want, axis=1, keepdims=True))
    assert np.allclose(B.weighted_rows(name, gloss, 0.0), [[1.0, 0.0], [0.0, 1.0]])


def test_expanded_queries_move_toward_their_class_mix() -> None:
    E = np.eye(3)
    q = np.array([[0.9, 0.1, 0.0]])
    sharp = B.expand_queries(q, E, 1.0, 1e-3)  # the mix is the nearest class itself
    want = q / np.linalg.norm(q) + E[0]
    assert np.allclose(sharp, want / np.linalg.norm(want))
    assert np.allclose(B.expand_queries(q, E, 0.0, 0.05), q / np.linalg.norm(q))
    assert sharp[0, 0] > (q / np.linalg.norm(q))[0, 0]


def test_image_distribution_is_the_recipes_truncated_softmax() -> None:
    logits = np.array([[3.0, 1.0, 0.0, -2.0]])
    p = B.image_distribution(logits, 2.0, 2)
    z = np.exp(np.array([1.5, 0.5]) - 1.5)
    want = np.array([z[0], z[1], 0.0, 0.0])
    assert np.allclose(p, want / np.linalg.norm(want))  # unit length: ranked by cosine
    assert np.allclose(B.softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])
