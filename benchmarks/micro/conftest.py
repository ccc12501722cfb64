"""Shared data for the pytest-benchmark micro-benchmarks (``pytest benchmarks --benchmark-only``).

Sizes (environment): LEANCLIP_MICRO_N corpus rows (default 20,000), LEANCLIP_MICRO_DIM (512),
LEANCLIP_MICRO_Q batch queries (1,000), LEANCLIP_MICRO_MINE_N mining queries = corpus rows
(10,000). Every benchmark also checks its result against numpy's exact answer, so a run with
``--benchmark-disable`` (CI: each function once, untimed) still tests that the code works.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks import _harness as H

K = 10


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


N = _env("LEANCLIP_MICRO_N", 20_000)
DIM = _env("LEANCLIP_MICRO_DIM", 512)
Q = _env("LEANCLIP_MICRO_Q", 1_000)
MINE_N = _env("LEANCLIP_MICRO_MINE_N", 10_000)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_topk(queries: np.ndarray, data: np.ndarray, k: int = K) -> np.ndarray:
    scores = queries.astype(np.float64) @ data.T.astype(np.float64)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(got, want) -> float:
    got = np.asarray(got).reshape(len(want), -1)
    return float(np.mean([len(set(g.tolist()) & set(w.tolist())) / len(w) for g, w in zip(got, want)]))


@pytest.fixture(scope="session")
def data():
    rng = np.random.default_rng(0)
    corpus, queries = unit(rng, N), unit(rng, Q)
    return {"corpus": corpus, "queries": queries, "truth": exact_topk(queries[:100], corpus)}


@pytest.fixture(scope="session")
def mining_data():
    rng = np.random.default_rng(1)
    x = unit(rng, MINE_N)
    groups = np.arange(MINE_N, dtype=np.int64) // 5
    return x, groups


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved JSON names the CPU family and SIMD level, so runs compare like with like."""
    machine_info["cpu_family"] = H.cpu_family()
    machine_info["cpu_description"] = H.cpu_description()
    machine_info["load_average"] = list(os.getloadavg())
    try:
        from leanclip import _engine

        machine_info["leanclip_simd"] = _engine.simd_level()
    except ImportError:
        pass
