"""Hypothesis: random sequences of add / upsert / remove / get / search / save / load agree with
a pure-Python model of the index."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from leanclip import Index

DIM = 3
KEYS = st.integers(min_value=0, max_value=12) | st.sampled_from([2**63, 2**64 - 1])
# Small integers: inner products and distances are exact in float32, so scores can be compared
# exactly and ties (equal vectors) really happen.
VECTOR = st.lists(st.integers(-3, 3), min_size=DIM, max_size=DIM).filter(any)


def model_score(metric: str, stored: np.ndarray, query: np.ndarray) -> float:
    if metric == "l2":
        return float(((stored - query) ** 2).sum())
    return float(stored @ query)


class IndexModel(RuleBasedStateMachine):
    metric = "ip"

    def __init__(self):
        super().__init__()
        self.index = Index(DIM, self.metric)
        self.model: dict[int, np.ndarray] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="leanclip-props-"))

    def stored(self, vector) -> np.ndarray:
        v = np.asarray(vector, np.float64)
        if self.metric == "cos":
            v = v / np.linalg.norm(v)
        return v

    @rule(batch=st.dictionaries(KEYS, VECTOR, max_size=5))
    def add(self, batch):
        keys, vectors = list(batch), list(batch.values())
        present = [k for k in keys if k in self.model]
        try:
            self.index.add(keys, np.array(vectors, np.float32).reshape(-1, DIM))
        except KeyError:
            assert present, "KeyError although no key was present"
        else:
            assert not present, f"add accepted present keys {present}"
            for k, v in batch.items():
                self.model[k] = self.stored(v)

    @rule(batch=st.dictionaries(KEYS, VECTOR, max_size=5))
    def upsert(self, batch):
        self.index.upsert(list(batch), np.array(list(batch.values()), np.float32).reshape(-1, DIM))
        for k, v in batch.items():
            self.model[k] = self.stored(v)

    @rule(keys=st.lists(KEYS, max_size=6))
    def remove(self, keys):
        want = len(set(keys) & set(self.model))
        assert self.index.remove(keys) == want
        for k in keys:
            self.model.pop(k, None)

    @rule(keys=st.lists(KEYS, max_size=4))
    def get(self, keys):
        if all(k in self.model for k in keys):
            got = self.index.get(keys)
            want = np.array([self.model[k] for k in keys]).reshape(-1, DIM)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        else:
            with pytest.raises(KeyError):
                self.index.get(keys)

    @rule(
        queries=st.lists(VECTOR, min_size=1, max_size=10),
        k=st.integers(1, 8),
        exclude=st.lists(KEYS, max_size=3),
    )
    def search(self, queries, k, exclude):
        qs = np.array(queries, np.float32)
        got_keys, got_scores = self.index.search(qs, k=k, exclude=exclude or None)
        eligible = [key for key in self.model if key not in set(exclude)]
        assert got_keys.shape == (len(queries), min(k, len(eligible)))
        for query, keys_row, scores_row in zip(qs, got_keys, got_scores):
            q = self.stored(query)
            scored = {key: model_score(self.metric, self.model[key], q) for key in eligible}
            better_first = -1 if self.metric != "l2" else 1
            want = sorted(scored, key=lambda key: (better_first * scored[key], key))[: len(keys_row)]
            want_scores = [scored[key] for key in want]
            np.testing.assert_allclose(scores_row, want_scores, rtol=1e-5, atol=1e-5)
            if self.metric == "cos":
                # normalization rounds differently here and there: allow near-ties to swap
                for key, score in zip(keys_row, scores_row):
                    assert abs(scored[int(key)] - score) < 1e-5
            else:
                assert [int(x) for x in keys_row] == want

    @rule()
    def save_and_reload(self):
        path = self.tmp / "index.lcx"
        self.index.save(path)
        mapped = Index.load(path, mmap=True)
        assert sorted(mapped.keys().tolist()) == sorted(self.model)
        self.index = Index.load(path)

    @invariant()
    def same_keys(self):
        assert len(self.index) == len(self.model)
        assert sorted(self.index.keys().tolist()) == sorted(self.model)
        for k in list(self.model)[:3]:
            assert k in self.index


class IndexModelCos(IndexModel):
    metric = "cos"


class IndexModelL2(IndexModel):
    metric = "l2"


_settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestIndexModelIp = IndexModel.TestCase
TestIndexModelIp.settings = _settings
TestIndexModelCos = IndexModelCos.TestCase
TestIndexModelCos.settings = _settings
TestIndexModelL2 = IndexModelL2.TestCase
TestIndexModelL2.settings = _settings
