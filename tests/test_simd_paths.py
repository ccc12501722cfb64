"""Every SIMD path this CPU has (amx: the AVX-512 kernels with AMX tile products), forced with LEANCLIP_SIMD in a subprocess each, against numpy:
index search (one query and batches: the per-row kernels and the packed matrix products,
including the i8 / bf16 scans with their exact re-score) for f32 / f16 / i8 storage and every
metric on odd shapes, mining at every scan precision, and the recall the batches keep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

LEVELS = ["scalar", "avx2", "avx512", "amx", "neon"]

# Runs in a child process with LEANCLIP_SIMD set: reads cases from an npz, writes results.
CHILD = r"""
import json, sys
import numpy as np
import leanclip
from leanclip import _engine

data = np.load(sys.argv[1])
cases = json.loads(str(data["cases"]))
out = {"level": _engine.simd_level()}
for c in cases:
    name = c["name"]
    x, q = data[name + "_x"], data[name + "_q"]
    if c["kind"] == "index":
        index = leanclip.Index(x.shape[1], metric=c["metric"], dtype=c["dtype"])
        index.add(np.arange(len(x), dtype=np.uint64) * 3 + 1, x)
        keys, scores = index.search(q, k=c["k"])
        out[name + "_keys"], out[name + "_scores"] = keys, scores
        k1, s1 = index.search(q[0], k=c["k"])
        out[name + "_keys1"], out[name + "_scores1"] = k1, s1
    else:
        qg, cg = data[name + "_qg"], data[name + "_cg"]
        ids, scores = leanclip.mine_hard_negatives(
            q, x, c["k"], qg, cg, metric=c["metric"], precision=c["precision"])
        out[name + "_keys"], out[name + "_scores"] = ids, scores
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items()})
"""


def _run(level: str, data: str, out: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LEANCLIP_SIMD=level)
    return subprocess.run(
        [sys.executable, "-c", CHILD, data, out], env=env, capture_output=True, text=True, timeout=600
    )


def _level_of(request: str) -> tuple[str, str]:
    env = dict(os.environ, LEANCLIP_SIMD=request)
    p = subprocess.run(
        [sys.executable, "-c", "from leanclip import _engine; print(_engine.simd_level())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return p.stdout.strip(), p.stderr


def _available() -> list[str]:
    return [lvl for lvl in LEVELS if _level_of(lvl)[0] == lvl]


AVAILABLE = _available()


def test_the_switch_names_the_level_it_runs_and_warns_on_bad_values():
    assert "scalar" in AVAILABLE
    best, err = _level_of("")
    assert best == AVAILABLE[-1] if AVAILABLE[-1] != "neon" else best == "neon"
    assert err == ""
    level, err = _level_of("sse9")
    assert level == best
    assert "unknown LEANCLIP_SIMD" in err and "sse9" in err
    for name in LEVELS:
        if name not in AVAILABLE and name != "neon":
            level, err = _level_of(name)
            assert level in AVAILABLE and "not supported by this CPU" in err


def _quantize_i8(x: np.ndarray) -> np.ndarray:
    """The index's i8 storage: per-row scale max|x| / 127, round half to even."""
    scale = np.abs(x).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(x / scale), -127, 127) * scale


def _stored(x: np.ndarray, dtype: str, metric: str) -> np.ndarray:
    x = x.astype(np.float64)
    if metric == "cos":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if dtype == "f16":
        x = x.astype(np.float16).astype(np.float64)
    elif dtype == "i8":
        x = _quantize_i8(x)
    return x


def _scores(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    q = q.astype(np.float64)
    if metric == "cos":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        return q @ x.T
    if metric == "ip":
        return q @ x.T
    return (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * q @ x.T


def _check_topk(got_rows, got_scores, ref, metric, k, tol, what):
    """Rank-wise scores equal the reference's top k, and every returned row has its score."""
    sign = 1.0 if metric == "l2" else -1.0
    for i in range(ref.shape[0]):
        want = np.sort(sign * ref[i])[:k] * sign
        np.testing.assert_allclose(got_scores[i], want, atol=tol, rtol=tol, err_msg=f"{what} q{i}")
        assert len(set(got_rows[i].tolist())) == len(got_rows[i]), f"{what}: repeated rows"
        np.testing.assert_allclose(
            got_scores[i], ref[i, got_rows[i]], atol=tol, rtol=tol, err_msg=f"{what} q{i}: a row's score"
        )


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    meta = []
    # dims 1..1025; row counts that are not multiples of any tile; batches below and above
    # the matrix-product threshold (8 queries).
    for dim, n, nq in [(1, 5, 9), (7, 37, 13), (33, 1100, 9), (64, 301, 30), (255, 70, 8), (1025, 90, 12)]:
        for dtype in ["f32", "f16", "i8"]:
            for metric in ["ip", "cos", "l2"]:
                name = f"idx_{dim}_{dtype}_{metric}"
                x = (rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32)
                if dtype == "i8":
                    x[0, :] = 1.0 / np.sqrt(dim)  # quantizes to all +127
                    if n > 1:
                        x[1, 0] = -3.0  # one element at -127, the rest near 0
                arrays[name + "_x"] = x
                arrays[name + "_q"] = (rng.standard_normal((nq, dim)) / np.sqrt(dim)).astype(np.float32)
                meta.append({"name": name, "kind": "index", "dtype": dtype, "metric": metric, "k": min(5, n)})
    for dim, n, nq in [(33, 1100, 40), (1025, 300, 20), (100, 2000, 64)]:
        for precision in ["f32", "bf16", "i8"]:
            for metric in ["ip", "cos", "l2"]:
                name = f"mine_{dim}_{precision}_{metric}"
                arrays[name + "_x"] = rng.standard_normal((n, dim)).astype(np.float32)
                arrays[name + "_q"] = rng.standard_normal((nq, dim)).astype(np.float32)
                arrays[name + "_qg"] = np.arange(nq, dtype=np.int64) % 7
                arrays[name + "_cg"] = np.arange(n, dtype=np.int64) % 7
                meta.append({"name": name, "kind": "mine", "precision": precision, "metric": metric, "k": 5})
    path = tmp_path_factory.mktemp("simd") / "cases.npz"
    np.savez(path, cases=np.array(json.dumps(meta)), **arrays)
    return str(path), meta, arrays


@pytest.mark.parametrize("level", LEVELS)
def test_every_path_matches_numpy(level, cases, tmp_path):
    if level not in AVAILABLE:
        pytest.skip(f"this CPU has no {level} path (has {', '.join(AVAILABLE)})")
    path, meta, arrays = cases
    out = tmp_path / "out.npz"
    p = _run(level, path, str(out))
    assert p.returncode == 0, p.stderr
    res = np.load(out)
    assert str(res["level"]) == level
    for c in meta:
        name, metric = c["name"], c["metric"]
        x, q = arrays[name + "_x"], arrays[name + "_q"]
        if c["kind"] == "index":
            stored = _stored(x, c["dtype"], metric)
            ref = _scores(q, stored, metric)
            tol = 2e-3 if c["dtype"] == "i8" else 2e-4
            rows = (res[name + "_keys"].astype(np.int64) - 1) // 3
            _check_topk(rows, res[name + "_scores"], ref, metric, c["k"], tol, f"{level} {name}")
            rows1 = (res[name + "_keys1"].astype(np.int64) - 1) // 3
            _check_topk(
                rows1[None], res[name + "_scores1"][None], ref[:1], metric, c["k"], tol, f"{level} {name} Q=1"
            )
        else:
            ref = _scores(q, _stored(x, "f32", metric), metric)
            qg, cg = arrays[name + "_qg"], arrays[name + "_cg"]
            ref[qg[:, None] == cg[None, :]] = np.inf if metric == "l2" else -np.inf
            scale = 1.0 if metric == "cos" else float(np.abs(ref[np.isfinite(ref)]).max())
            _check_topk(
                res[name + "_keys"],
                res[name + "_scores"],
                ref,
                metric,
                c["k"],
                1e-5 * scale + 1e-5,
                f"{level} {name}",
            )


RECALL_CHILD = r"""
import sys
import numpy as np
import leanclip

rng = np.random.default_rng(3)
dim, n, nq, k = 256, 6000, 64, 10
centres = rng.standard_normal((40, dim))
x = (centres[rng.integers(0, 40, n)] + 0.7 * rng.standard_normal((n, dim))).astype(np.float32)
q = (centres[rng.integers(0, 40, nq)] + 0.7 * rng.standard_normal((nq, dim))).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
q /= np.linalg.norm(q, axis=1, keepdims=True)
truth = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)[:, :k]
for dtype in ["f32", "f16", "i8"]:
    index = leanclip.Index(dim, metric="ip", dtype=dtype)
    index.add(np.arange(n, dtype=np.uint64), x)
    batch, _ = index.search(q, k=k)
    single = np.stack([index.search(qi, k=k)[0] for qi in q])
    for what, got in [("batch", batch), ("single", single)]:
        hits = sum(len(set(g.tolist()) & set(t.tolist())) for g, t in zip(got, truth))
        print(dtype, what, hits / (nq * k))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_batched_quantized_search_keeps_the_single_query_recall(level):
    if level not in AVAILABLE:
        pytest.skip(f"this CPU has no {level} path")
    env = dict(os.environ, LEANCLIP_SIMD=level)
    p = subprocess.run(
        [sys.executable, "-c", RECALL_CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    recall = {}
    for line in p.stdout.splitlines():
        dtype, what, r = line.split()
        recall[(dtype, what)] = float(r)
    assert recall[("f32", "batch")] == 1.0 and recall[("f32", "single")] == 1.0
    assert recall[("f16", "batch")] >= 0.999, recall
    assert recall[("i8", "batch")] >= 0.98, recall
    # The batch (i8 / bf16 scan + exact re-score) loses nothing against one query at a time.
    assert recall[("f16", "batch")] >= recall[("f16", "single")] - 0.002, recall
    assert recall[("i8", "batch")] >= recall[("i8", "single")] - 0.002, recall
