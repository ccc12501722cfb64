"""leanclip.IVFIndex: exactness with every list probed (numpy brute force and leanclip.Index),
approximate recall, training, the Index-compatible API and errors, and a hypothesis state
machine against a pure-Python model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from leanclip import Index, IVFIndex
from tests._fixtures_index import reference_scores


def clustered(n, dim, centers, seed, spread=0.15):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim))
    labels = rng.integers(0, centers, n)
    return (means[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def check_equals_brute_force(index, keys, vectors, queries, k, tol):
    got_keys, got_scores = index.search(queries, k=k)
    scores, primary = reference_scores(index.metric, vectors, queries)
    for qi in range(len(queries)):
        order = np.lexsort((keys, primary[qi]))[:k]
        want_keys = keys[order]
        want_scores = scores[qi, order]
        np.testing.assert_allclose(got_scores[qi], want_scores, rtol=tol, atol=tol)
        # Keys equal, except where the reference scores are closer than the tolerance.
        for j in np.nonzero(got_keys[qi] != want_keys)[0]:
            close = np.abs(scores[qi] - want_scores[j]) <= 2 * tol * (1 + abs(want_scores[j]))
            assert got_keys[qi, j] in keys[close], (qi, j)


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_all_lists_probed_equals_numpy_brute_force(metric):
    x = clustered(3000, 24, 12, seed=1)
    keys = np.random.default_rng(2).choice(10**12, size=len(x), replace=False).astype(np.uint64)
    index = IVFIndex(24, metric, nlist=16, nprobe=16, train_threshold=0)
    index.add(keys, x)
    index.train(x)
    assert index.is_trained and len(index.list_sizes()) == 16
    queries = clustered(40, 24, 12, seed=3)
    check_equals_brute_force(index, keys, x, queries, 10, 1e-5)
    check_equals_brute_force(index, keys, x, queries[:1], 10, 1e-5)


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_all_lists_probed_equals_the_exact_index_with_integer_ties(metric, dtype):
    # Small integer vectors: scores are exact in every code path and ties are frequent, so the
    # keys must match exactly, ties broken by ascending key.
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, size=(800, 6)).astype(np.float32)
    x[np.all(x == 0, axis=1)] = 1.0
    keys = rng.choice(2**62, size=len(x), replace=False).astype(np.uint64)
    ivf = IVFIndex(6, metric, dtype, nlist=8, nprobe=8, train_threshold=0)
    ivf.add(keys, x)
    ivf.train(x)
    flat = Index(6, metric, dtype)
    flat.add(keys, x)
    queries = rng.integers(-3, 4, size=(20, 6)).astype(np.float32)
    queries[np.all(queries == 0, axis=1)] = 1.0
    for q in (queries, queries[0]):
        ik, isc = ivf.search(q, k=15)
        fk, fsc = flat.search(q, k=15)
        np.testing.assert_array_equal(ik, fk)
        np.testing.assert_allclose(isc, fsc, rtol=1e-5, atol=1e-5)
    exclude = keys[:50]
    ik, _ = ivf.search(queries, k=15, exclude=exclude)
    fk, _ = flat.search(queries, k=15, exclude=exclude)
    np.testing.assert_array_equal(ik, fk)


def test_few_probes_keep_high_recall_on_clustered_data_and_fill_k():
    x = clustered(6200, 32, 40, seed=4)
    x, queries = x[:6000], x[6000:]
    keys = np.arange(len(x), dtype=np.uint64)
    ivf = IVFIndex(32, "cos", "i8", nlist=32, nprobe=4, rerank=40, seed=5, train_threshold=0)
    ivf.add(keys, x)
    ivf.train(x)
    flat = Index(32, "cos")
    flat.add(keys, x)
    got, _ = ivf.search(queries, k=10)
    want, _ = flat.search(queries, k=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want.tolist())])
    assert recall >= 0.9, recall
    ivf.nprobe = 1
    got, _ = ivf.search(queries, k=500)
    assert got.shape == (200, 500)  # lists beyond nprobe are scanned when the probed hold < k
    assert all(len(set(row)) == 500 for row in got.tolist())


def test_untrained_index_is_exact_and_trains_itself_at_the_threshold():
    x = clustered(500, 8, 5, seed=8)
    keys = np.arange(500, dtype=np.uint64)
    ivf = IVFIndex(8, "l2", nlist=4, nprobe=1, train_threshold=300)
    assert ivf.train_threshold == 300 and not ivf.is_trained
    ivf.add(keys[:299], x[:299])
    assert not ivf.is_trained and ivf.list_sizes().tolist() == [299]
    check_equals_brute_force(ivf, keys[:299], x[:299], x[400:410], 5, 1e-4)
    ivf.add(keys[299:], x[299:])
    assert ivf.is_trained and len(ivf.list_sizes()) == 4 and ivf.list_sizes().sum() == 500
    assert IVFIndex(8, nlist=4).train_threshold == 4 * 64


def test_training_is_deterministic_given_the_seed():
    x = clustered(2000, 16, 10, seed=9)
    keys = np.arange(2000, dtype=np.uint64)

    def build(seed):
        ivf = IVFIndex(16, "cos", nlist=10, seed=seed, train_threshold=0)
        ivf.add(keys, x)
        ivf.train(x)
        return ivf.list_sizes().tolist(), [sorted(ivf.keys().tolist())]

    assert build(3) == build(3)
    assert build(3)[0] != build(4)[0]


def test_retrain_and_adds_after_training_go_to_the_nearest_list():
    x = clustered(3000, 16, 8, seed=10, spread=0.05)
    keys = np.arange(3000, dtype=np.uint64)
    ivf = IVFIndex(16, "l2", nlist=8, nprobe=1, train_threshold=0)
    ivf.train(x[:1000])
    ivf.add(keys, x)
    # With well separated clusters and one probe, each vector finds itself.
    got, scores = ivf.search(x[::50], k=1)
    np.testing.assert_array_equal(got[:, 0], keys[::50])
    before = ivf.list_sizes().copy()
    ivf.retrain()
    assert ivf.list_sizes().sum() == before.sum() == 3000
    got, _ = ivf.search(x[::50], k=1)
    np.testing.assert_array_equal(got[:, 0], keys[::50])


def test_rerank_needs_float32_copies_and_recovers_exact_scores():
    x = clustered(1000, 16, 4, seed=11)
    keys = np.arange(1000, dtype=np.uint64)
    ivf = IVFIndex(16, "ip", "i8", nlist=4, nprobe=4, rerank=64, train_threshold=0)
    ivf.add(keys, x)
    ivf.train(x)
    flat = Index(16, "ip")
    flat.add(keys, x)
    got, gs = ivf.search(x[:20], k=10)
    want, ws = flat.search(x[:20], k=10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(gs, ws, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ivf.get(keys[:3]), x[:3])  # the copies, not dequantized
    with pytest.raises(ValueError, match="rerank"):
        IVFIndex(16, "ip", "f32", rerank=10)
    plain = IVFIndex(16, "ip", "i8")
    with pytest.raises(ValueError, match="float32 copies"):
        plain.rerank = 5
    ivf.rerank = 0
    assert ivf.rerank == 0


def test_codes_find_the_neighbours_and_report_the_stored_vectors_scores():
    x = clustered(4000, 32, 16, seed=21, spread=0.5)
    keys = np.arange(4000, dtype=np.uint64) * 3
    coded = IVFIndex(32, "cos", "i8", nlist=16, nprobe=16, pq=32, shortlist=40, train_threshold=0)
    coded.add(keys, x)
    coded.train(x)
    assert coded.pq == 32 and coded.shortlist == 40 and "pq=32, shortlist=40" in repr(coded)
    flat = Index(32, "cos", "i8")
    flat.add(keys, x)
    queries = clustered(50, 32, 16, seed=22, spread=0.5)
    got, got_scores = coded.search(queries, k=10)
    want, _ = flat.search(queries, k=10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.9
    # Scores are the stored vectors' (as Index reports them), one query or a batch alike.
    for qi in range(5):
        one, one_scores = coded.search(queries[qi], k=10)
        np.testing.assert_array_equal(one, got[qi])
        np.testing.assert_array_equal(one_scores, got_scores[qi])
        _, exact_scores = flat.search(queries[qi], k=len(flat))
        assert set(one_scores.tolist()) <= set(exact_scores.tolist())
    # A shortlist as long as the index is exact.
    coded.shortlist = len(coded)
    got, _ = coded.search(queries, k=10)
    np.testing.assert_array_equal(got, want)


def test_codes_survive_save_and_mmap_load(tmp_path):
    x = clustered(1500, 16, 8, seed=23)
    keys = np.arange(1500, dtype=np.uint64)
    ivf = IVFIndex(16, "l2", "f16", nlist=8, nprobe=3, pq=8, shortlist=30, train_threshold=0)
    ivf.add(keys, x)
    ivf.train(x)
    ivf.remove(keys[:10])
    path = tmp_path / "coded.ivf"
    ivf.save(path)
    for mmap in (False, True):
        back = IVFIndex.load(path, mmap=mmap)
        assert back.pq == 8 and back.shortlist == 30
        a, sa = back.search(x[:30], k=5)
        b, sb = ivf.search(x[:30], k=5)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)


def test_bad_pq_settings_name_the_problem():
    with pytest.raises(ValueError, match="even number"):
        IVFIndex(12, pq=3)
    with pytest.raises(ValueError, match="divides dim = 12"):
        IVFIndex(12, pq=8)
    with pytest.raises(ValueError, match="shortlist needs pq"):
        IVFIndex(12, shortlist=10)
    with pytest.raises(ValueError, match="shortlist must be at least 1"):
        IVFIndex(12, pq=4, shortlist=0)
    ivf = IVFIndex(12, pq=4)
    assert ivf.shortlist == 100
    with pytest.raises(ValueError, match="shortlist"):
        ivf.shortlist = 0
    # The setter keeps the constructor's rule: no shortlist without codes.
    plain = IVFIndex(12)
    with pytest.raises(ValueError, match="shortlist needs pq"):
        plain.shortlist = 10
    assert plain.shortlist == 100


@pytest.mark.parametrize("dtype", ["f16", "i8"])
@pytest.mark.parametrize("metric", ["cos", "ip"])
def test_batches_ranking_by_principal_directions_equal_brute_force_on_data_of_that_rank(metric, dtype):
    # 24-d vectors in an 8-d subspace: 8 principal directions keep every inner product, and
    # the batch re-scores its candidates from the stored rows.
    rng = np.random.default_rng(11)
    x = (clustered(3000, 8, 12, seed=12) @ rng.standard_normal((8, 24))).astype(np.float32)
    keys = np.arange(len(x), dtype=np.uint64) * 3
    index = IVFIndex(24, metric, dtype, nlist=16, nprobe=16, train_threshold=0, scan_dims=8)
    assert index.scan_dims == 8 and "scan_dims=8" in repr(index)
    index.train(x)
    index.add(keys, x)
    queries = x[:40] + 0.05 * x[40:80]
    stored = index.get(keys)  # f16 / i8 rows as stored: the scores a search reports
    check_equals_brute_force(index, keys, stored, queries, 10, 2e-3)


def test_scan_dims_trades_dimensions_for_speed_and_names_bad_settings(tmp_path):
    # A decaying spectrum, as real embeddings have (random directions, scales 0.85^i).
    rng = np.random.default_rng(13)
    rotation, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    scales = 0.85 ** np.arange(32)
    x = ((rng.standard_normal((4000, 32)) * scales) @ rotation).astype(np.float32)
    keys = np.arange(len(x), dtype=np.uint64)
    index = IVFIndex(32, "cos", "f16", nlist=32, nprobe=32, train_threshold=0)
    index.train(x)
    index.add(keys, x)
    queries = ((rng.standard_normal((64, 32)) * scales) @ rotation).astype(np.float32)
    exact_keys, exact_scores = index.search(queries, k=10)
    index.scan_dims = 16
    got_keys, got_scores = index.search(queries, k=10)
    # Half the directions keep most neighbours, and every reported score is the exact score
    # of its key.
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_keys, exact_keys)])
    assert recall > 0.9, recall
    for qk, qs, q in zip(got_keys, got_scores, queries):
        _, alone = index.search(q, k=1000)
        k_alone, _ = index.search(q, k=1000)
        want = dict(zip(k_alone.tolist(), alone.tolist()))
        assert [want[k] for k in qk.tolist()] == qs.tolist()
    index.save(tmp_path / "x.lcivf")
    back = IVFIndex.load(tmp_path / "x.lcivf", mmap=True)
    assert back.scan_dims == 16
    np.testing.assert_array_equal(back.search(queries, k=10)[0], got_keys)
    index.scan_dims = 0
    np.testing.assert_array_equal(index.search(queries, k=10)[0], exact_keys)
    with pytest.raises(ValueError, match="below dim = 32, got 32"):
        index.scan_dims = 32
    with pytest.raises(ValueError, match="scan_dims must be"):
        index.scan_dims = -1
    with pytest.raises(ValueError, match='needs dtype "f16" or "i8"'):
        IVFIndex(32, "cos", "f32", scan_dims=8)
    with pytest.raises(ValueError, match='needs metric "cos" or "ip"'):
        IVFIndex(32, "l2", "i8", scan_dims=8)


def test_errors_match_index():
    ivf = IVFIndex(4, "cos", nlist=2, train_threshold=0)
    ivf.add([1, 2], np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(KeyError, match="already"):
        ivf.add([2], np.ones((1, 4)))
    with pytest.raises(ValueError, match="more than once"):
        ivf.add([5, 5], np.ones((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        ivf.add([6], np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        ivf.add([7], np.array([[1, np.nan, 0, 0]]))
    with pytest.raises(ValueError, match="zero vector"):
        ivf.add([8], np.zeros((1, 4)))
    with pytest.raises(KeyError):
        ivf.get([99])
    with pytest.raises(ValueError, match="k must be"):
        ivf.search(np.ones(4), k=0)
    with pytest.raises(ValueError, match="queries"):
        ivf.search(np.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        ivf.remove([-1])
    with pytest.raises(ValueError, match="nprobe"):
        ivf.nprobe = 0
    with pytest.raises(ValueError, match="nlist"):
        IVFIndex(4, nlist=0)
    with pytest.raises(ValueError, match="at least nlist"):
        ivf.train(np.ones((1, 4)))
    with pytest.raises(ValueError, match="metric"):
        IVFIndex(4, "hamming")
    with pytest.raises(ValueError, match="train_threshold"):
        IVFIndex(4, nlist=8, train_threshold=3)
    assert len(ivf) == 2 and 1 in ivf and 7 not in ivf and "x" not in ivf
    assert ivf.remove([1, 1, 42]) == 1
    keys, scores = ivf.search(np.ones(4), k=10)
    assert keys.tolist() == [2] and scores.shape == (1,)
    keys, _ = ivf.search(np.ones((3, 4)), k=10, exclude=[2])
    assert keys.shape == (3, 0)
    assert "IVFIndex(dim=4" in repr(ivf)


def test_searches_run_while_another_thread_writes():
    x = clustered(4000, 16, 8, seed=12)
    ivf = IVFIndex(16, "cos", nlist=8, nprobe=2, train_threshold=0)
    ivf.add(np.arange(2000, dtype=np.uint64), x[:2000])
    ivf.train(x[:2000])
    errors = []

    def writer():
        try:
            for i in range(2000, 4000, 100):
                ivf.add(np.arange(i, i + 100, dtype=np.uint64), x[i : i + 100])
                ivf.remove(np.arange(i - 2000, i - 1950, dtype=np.uint64))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():
        keys, _ = ivf.search(x[:32], k=5)
        assert keys.shape == (32, 5)
    t.join()
    assert not errors
    assert len(ivf) == 4000 - 20 * 50


# ---------------------------------------------------------------------------------------------
# Hypothesis: a model of the key -> vector map; searches with every list probed are exact.

DIM = 4
KEYS = st.integers(min_value=0, max_value=14) | st.sampled_from([2**63, 2**64 - 1])
VECTOR = st.lists(st.integers(-3, 3), min_size=DIM, max_size=DIM).filter(any)


class IVFModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # trains itself at 6 vectors; nprobe = nlist keeps searches exact
        self.index = IVFIndex(DIM, "ip", nlist=3, nprobe=3, train_threshold=6, seed=1)
        self.model: dict[int, np.ndarray] = {}

    @rule(batch=st.dictionaries(KEYS, VECTOR, max_size=5))
    def add(self, batch):
        present = [k for k in batch if k in self.model]
        try:
            self.index.add(list(batch), np.array(list(batch.values()), np.float32).reshape(-1, DIM))
        except KeyError:
            assert present
        else:
            assert not present
            self.model.update({k: np.array(v, np.float64) for k, v in batch.items()})

    @rule(batch=st.dictionaries(KEYS, VECTOR, max_size=5))
    def upsert(self, batch):
        self.index.upsert(list(batch), np.array(list(batch.values()), np.float32).reshape(-1, DIM))
        self.model.update({k: np.array(v, np.float64) for k, v in batch.items()})

    @rule(keys=st.lists(KEYS, max_size=6))
    def remove(self, keys):
        assert self.index.remove(keys) == len(set(keys) & set(self.model))
        for k in keys:
            self.model.pop(k, None)

    @rule(keys=st.lists(KEYS, max_size=4))
    def get(self, keys):
        if all(k in self.model for k in keys):
            want = np.array([self.model[k] for k in keys]).reshape(-1, DIM)
            np.testing.assert_array_equal(self.index.get(keys), want)
        else:
            with pytest.raises(KeyError):
                self.index.get(keys)

    @rule()
    def retrain(self):
        if len(self.model) >= 3:
            self.index.retrain()

    @rule(query=VECTOR, k=st.integers(1, 20), exclude=st.lists(KEYS, max_size=3))
    def search(self, query, k, exclude):
        q = np.array(query, np.float64)
        got_keys, got_scores = self.index.search(np.array(query, np.float32), k=k, exclude=exclude)
        cands = sorted(((-float(v @ q), key) for key, v in self.model.items() if key not in exclude))
        want = cands[:k]
        assert got_keys.tolist() == [key for _, key in want]
        assert got_scores.tolist() == [-s for s, _ in want]

    @invariant()
    def same_keys(self):
        assert len(self.index) == len(self.model)
        assert sorted(self.index.keys().tolist()) == sorted(self.model)


TestIVFModel = IVFModel.TestCase
TestIVFModel.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)


class IVFCodesModel(IVFModel):
    """The same model with 4-bit codes: a shortlist longer than the index keeps searches exact,
    so codes must follow every add, upsert, removal and retraining."""

    def __init__(self):
        super().__init__()
        self.index = IVFIndex(DIM, "ip", nlist=3, nprobe=3, train_threshold=6, seed=1, pq=2, shortlist=1000)

    @invariant()
    def codes_once_trained(self):
        assert self.index.pq == 2 and self.index.shortlist == 1000


TestIVFCodesModel = IVFCodesModel.TestCase
TestIVFCodesModel.settings = TestIVFModel.settings


class IVFScanDimsModel(IVFModel):
    """f16 lists and batches ranked by 2 of 4 principal directions: a model this small holds
    fewer vectors than the batch re-scores (k + max(k, 64)), so batches stay exact, and the
    reduced packed copies must follow every add, upsert, removal and retraining."""

    def __init__(self):
        super().__init__()
        self.index = IVFIndex(DIM, "ip", "f16", nlist=3, nprobe=3, train_threshold=6, seed=1, scan_dims=2)

    @rule(queries=st.lists(VECTOR, min_size=8, max_size=10), k=st.integers(1, 20))
    def search_batch(self, queries, k):
        got_keys, got_scores = self.index.search(np.array(queries, np.float32), k=k)
        for row_keys, row_scores, query in zip(got_keys, got_scores, queries):
            q = np.array(query, np.float64)
            want = sorted((-float(v @ q), key) for key, v in self.model.items())[:k]
            assert row_keys[: len(want)].tolist() == [key for _, key in want]
            assert row_scores[: len(want)].tolist() == [-s for s, _ in want]


TestIVFScanDimsModel = IVFScanDimsModel.TestCase
TestIVFScanDimsModel.settings = TestIVFModel.settings
