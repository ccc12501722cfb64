"""The IVF benchmark's data and landing verdict: more held-out queries of a synthetic shape come
from their own stream (the stored vectors, timed queries and tune queries unchanged), an old
data file gains them in place, and tune's landing is judged on every held-out query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import bench_ivf
from benchmarks.data.shapes import SHAPES, generate, more_queries


@pytest.mark.parametrize("kind", SHAPES)
def test_more_queries_are_seeded_new_draws_of_the_same_process(kind):
    base, queries = generate(kind, 3000, 200, seed=0)
    more = more_queries(kind, 3000, 200, seed=0, stream=1)
    assert more.shape == queries.shape and more.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(more, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(more, more_queries(kind, 3000, 200, seed=0, stream=1))
    assert not np.allclose(more, more_queries(kind, 3000, 200, seed=0, stream=2))
    # new queries: none equals a generated query or a stored vector
    assert (more @ queries.T).max() < 0.9999 and (more @ base.T).max() < 0.9999
    # the same process: the best match to the stored vectors looks alike (mean cosine)
    best_q, best_m = (queries @ base.T).max(axis=1).mean(), (more @ base.T).max(axis=1).mean()
    assert abs(best_q - best_m) < 0.02, (best_q, best_m)


def test_more_queries_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown data shape 'spiral'"):
        more_queries("spiral", 100, 10)
    with pytest.raises(ValueError, match="stream >= 1"):
        more_queries("random", 100, 10, stream=0)


def test_old_data_file_gains_more_queries_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_ivf, "CACHE", tmp_path)
    monkeypatch.setattr(bench_ivf, "Q", 50)
    monkeypatch.setattr(bench_ivf, "LANDING", 200)
    base, both = generate("powerlaw", 2000, 100, seed=0)
    old = {
        "base": base,
        "queries": both[:50],
        "tune_queries": both[50:],
        "truth": np.zeros((50, 10), np.int64),
    }
    np.savez(tmp_path / "powerlaw-2000-seed0.npz", **old)
    d = np.load(bench_ivf.make_data("powerlaw", 2000))
    for key, value in old.items():  # what hnswlib's rows were measured on stays as it was
        np.testing.assert_array_equal(d[key], value)
    assert d["more_queries"].shape == (150, 384)
    exact = np.argsort(-(d["more_queries"] @ base.T), axis=1)[:, :10]
    overlap = [len(np.intersect1d(a, b)) for a, b in zip(exact, d["more_truth"])]
    assert np.mean(overlap) > 9.9  # the exact top 10 (ties aside)


def test_old_minilm_split_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_ivf, "CACHE", tmp_path)
    np.savez(tmp_path / "minilm-1000-seed0.npz", base=np.zeros((4, 3), np.float32))
    with pytest.raises(SystemExit, match="old MiniLM split"):
        bench_ivf.make_data("minilm", 1000)


class _Exact(bench_ivf.Peer):
    """The brute-force answer, except for a query whose first value is negative: nothing right."""

    def __init__(self, base):
        self.base = base

    def search(self, q):
        q2 = np.atleast_2d(q)
        found = np.argsort(-(q2 @ self.base.T), axis=1)[:, : bench_ivf.K]
        found[q2[:, 0] < 0] = len(self.base)  # a key that is never in the truth
        return found


def test_landing_counts_every_held_out_query_batch_and_single(monkeypatch):
    monkeypatch.setattr(bench_ivf, "Q", 100)
    base, queries = generate("random", 1000, 500, seed=3)
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    peer = _Exact(base)
    timed = peer.search(queries[:100])
    land = bench_ivf.landing(peer, (timed, timed), truth[:100], (queries[100:], truth[100:]))
    share = float(np.mean(queries[:, 0] >= 0))  # the queries answered right
    assert land["queries"] == 500
    assert land["recall"] == pytest.approx(share) and land["recall_single"] == pytest.approx(share)
    assert land["spread"] == pytest.approx(1.96 * np.sqrt(share * (1 - share) / 499), rel=1e-6)


def test_landing_verdict_uses_every_held_out_query_where_measured():
    point = {"recall": 0.885, "single": [{"recall": 0.88}]}
    assert bench_ivf._landing(point) == (0.885, 0.88)  # a run before more_queries
    point["landing"] = {"recall": 0.897, "recall_single": 0.895}
    assert bench_ivf._landing(point) == (0.897, 0.895)
    assert bench_ivf._landed(0.9, *bench_ivf._landing(point)).startswith("yes")
    assert bench_ivf._landed(0.9, 0.885, 0.88).startswith("UNDER")


def test_report_merges_result_files_peer_by_peer(tmp_path):
    def row(peer, n, tag):
        return {"peer": peer, "n": n, "tag": tag}

    old = {
        "powerlaw": [row("lean", 200, "old"), row("hnswlib", 200, "old")],
        "minilm": [row("hnswlib", 198, "old")],
    }
    new = {"powerlaw": [row("lean", 200, "new")], "minilm": [row("lean", 194, "new")]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    merged = bench_ivf.merge_results([str(tmp_path / "old.json"), str(tmp_path / "new.json")])
    assert [(r["peer"], r["tag"]) for r in merged["powerlaw"]] == [("lean", "new"), ("hnswlib", "old")]
    assert merged["minilm"] == [row("lean", 194, "new")]  # another size: the old rows go
