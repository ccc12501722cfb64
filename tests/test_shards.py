"""Index shards: four shard files searched as one equal one index over all the rows (exact, and
IVF at nprobe = nlist), IVF shards built from embedding files in bounded pieces are the same
files whatever the number of ranks, and bad inputs give one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import leanclip
from leanclip import build_ivf as build_ivf_cli
from leanclip.shards import (
    EmbeddingShards,
    ShardedIndex,
    ShardError,
    build_exact,
    build_ivf,
    merge_topk,
)

DIM = 32


def _corpus(n: int = 3001, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, DIM))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM))
    if n > 3000:  # exact ties, across shard boundaries once split
        x[100:140] = x[0:40]
        x[2990:3001] = x[0:11]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _files(tmp: Path, x: np.ndarray, cuts: list[int], dtype: type = np.float32) -> list[Path]:
    paths = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(x)])):
        paths.append(tmp / f"{i:05d}.npy")
        np.save(paths[-1], x[a:b].astype(dtype))
    return paths


def test_merge_topk_ranks_by_score_then_key_and_nan_last() -> None:
    keys = [np.array([[5, 2]], np.uint64), np.array([[1, 9]], np.uint64)]
    scores = [np.array([[0.5, np.nan]], np.float32), np.array([[0.5, 0.7]], np.float32)]
    k, s = merge_topk(keys, scores, 3)
    assert k.tolist() == [[9, 1, 5]] and s.tolist() == [[pytest.approx(0.7), 0.5, 0.5]]
    k, _ = merge_topk(keys, scores, 4, lowest_first=True)
    assert k.tolist() == [[1, 5, 9, 2]]


@pytest.mark.parametrize("metric", ["ip", "l2", "cos"])
def test_four_exact_shards_equal_one_index(tmp_path: Path, metric: str) -> None:
    x = _corpus()
    q = _corpus(37, seed=1)
    one = leanclip.Index(DIM, metric=metric)
    one.add(np.arange(len(x), dtype=np.uint64), x)
    paths = _files(tmp_path, x, [700, 1500, 2300])
    summary = build_exact(EmbeddingShards(paths), tmp_path / "exact", metric=metric, chunk=333)
    assert summary["vectors"] == len(x) and summary["files"] == 4
    for mmap in (False, True):
        sharded = ShardedIndex.load(tmp_path / "exact", mmap=mmap)
        assert len(sharded) == len(x) and 2999 in sharded and 3001 not in sharded
        for k in (1, 10, 50):
            got, expected = sharded.search(q, k), one.search(q, k)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])
        exclude = np.arange(0, 3001, 3, dtype=np.uint64)
        got, expected = sharded.search(q, 10, exclude=exclude), one.search(q, 10, exclude=exclude)
        np.testing.assert_array_equal(got[0], expected[0])
        k1, s1 = sharded.search(q[0], 5)  # one query: 1-D results, like Index
        assert k1.shape == (5,) and np.array_equal(k1, one.search(q[0], 5)[0])
    # one process's part of a distributed search: shards r, r + W, ...; beyond the shards, empty
    assert len(ShardedIndex.load(tmp_path / "exact", part=(1, 3))) == 800  # shard 1 (of 0..3)
    assert len(ShardedIndex.load(tmp_path / "exact", part=(0, 2))) == 700 + 800  # shards 0 and 2
    empty = ShardedIndex.load(tmp_path / "exact", part=(5, 6))
    assert len(empty) == 0 and empty.search(q, 3)[0].shape == (37, 0)
    small = ShardedIndex([one, leanclip.Index(DIM, metric=metric)], threads=1)  # an empty shard
    assert small.search(q, 4000)[0].shape == (37, len(x))


def test_ivf_shards_at_full_probe_equal_one_index(tmp_path: Path) -> None:
    x = _corpus()
    q = _corpus(41, seed=2)
    paths = _files(tmp_path, x, [1000, 1001, 2500], dtype=np.float16)  # a 1-row shard
    summary = build_ivf(EmbeddingShards(paths), tmp_path / "ivf", nlist=16, dtype="f32", seed=3, chunk=500)
    assert summary["vectors"] == len(x)
    manifest = json.loads((tmp_path / "ivf" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [1000, 1, 1499, 501]
    rows = x.astype(np.float16).astype(np.float32)
    exact = leanclip.Index(DIM, metric="ip")
    exact.add(np.arange(len(x), dtype=np.uint64), rows)
    # one IVF over every row with the same quantizer
    whole = leanclip.IVFIndex.load(tmp_path / "ivf" / "quantizer.ivf")
    whole.add(np.arange(len(x), dtype=np.uint64), rows)
    sharded = ShardedIndex.load(tmp_path / "ivf", mmap=True)
    assert all(s.read_only for s in sharded.shards)
    sharded.nprobe = whole.nprobe = 16
    got = sharded.search(q, 10)
    np.testing.assert_array_equal(got[0], whole.search(q, 10)[0])
    np.testing.assert_array_equal(got[1], whole.search(q, 10)[1])
    np.testing.assert_array_equal(got[0], exact.search(q, 10)[0])
    np.testing.assert_allclose(got[1], exact.search(q, 10)[1], rtol=1e-5, atol=1e-6)


def _spectrum(n: int, seed: int, tilt: float) -> np.ndarray:
    """Rows whose variance falls with the dimension (real embeddings' shape); ``tilt`` turns
    their principal directions, so shards of different tilts have directions of their own."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)) / np.sqrt(1 + np.arange(DIM))
    c, s = np.cos(tilt), np.sin(tilt)
    x[:, [0, 8]] = x[:, [0, 8]] @ np.array([[c, s], [-s, c]])
    return x.astype(np.float32)


def test_scan_dims_directions_are_trained_on_the_sample_across_shards(tmp_path: Path) -> None:
    """With ``scan_dims``, the quantizer trains its principal directions on the cross-shard
    sample and every shard file carries them: a batch through the manifest scores, per query,
    a superset of the candidates one index with the same quantizer scores, so its top k is at
    least as good rank by rank, and equal wherever one index's is exact."""
    x = np.concatenate([_spectrum(1500, 0, 0.0), _spectrum(1500, 1, 1.2)])
    q = _spectrum(60, 2, 0.6)
    paths = _files(tmp_path, x, [1500])
    knobs = {"nlist": 8, "dtype": "f16", "seed": 4, "scan_dims": 4}
    build_ivf(EmbeddingShards(paths), tmp_path / "ivf", **knobs)  # type: ignore[arg-type]
    quantizer = leanclip.IVFIndex.load(tmp_path / "ivf" / "quantizer.ivf")
    assert quantizer.directions is not None and quantizer.directions.shape == (DIM, DIM)
    sharded = ShardedIndex.load(tmp_path / "ivf", mmap=True)
    for shard in sharded.shards:
        assert shard.scan_dims == 4
        np.testing.assert_array_equal(shard.directions, quantizer.directions)
    whole = leanclip.IVFIndex.load(tmp_path / "ivf" / "quantizer.ivf")
    whole.add(np.arange(len(x), dtype=np.uint64), x)
    exact = leanclip.Index(DIM, metric="ip", dtype="f16")
    exact.add(np.arange(len(x), dtype=np.uint64), x)
    sharded.nprobe = whole.nprobe = 8
    got, one, best = sharded.search(q, 10), whole.search(q, 10), exact.search(q, 10)
    assert np.all(got[1] >= one[1]), "the manifest's k-th best is never below one index's"
    assert np.all(got[1] <= best[1] + 1e-6)
    exact_rows = np.all(one[0] == best[0], axis=1)
    assert 0 < exact_rows.sum() < len(q), "4 of 32 directions: some queries lose neighbours"
    np.testing.assert_array_equal(got[0][exact_rows], one[0][exact_rows])
    # directions trained on a given sample, saved with the index
    other = leanclip.IVFIndex.load(tmp_path / "ivf" / "00000.ivf")
    other.train_directions(x[:700])
    assert not np.allclose(other.directions, quantizer.directions)
    other.save(tmp_path / "again.ivf")
    np.testing.assert_array_equal(leanclip.IVFIndex.load(tmp_path / "again.ivf").directions, other.directions)
    with pytest.raises(ValueError, match="train_directions: scan_dims needs metric"):
        leanclip.IVFIndex(DIM, metric="l2", dtype="f16", nlist=4).train_directions(x[:10])
    assert leanclip.IVFIndex(DIM, metric="ip", dtype="f16", nlist=4).directions is None


@pytest.mark.parametrize("pq", [0, 8])
def test_single_queries_through_a_manifest_against_one_index(tmp_path: Path, pq: int) -> None:
    """Shards sharing one quantizer probe the same lists as one index with it. Without codes a
    single query scores the probed rows exactly, so the manifest returns what one index returns
    at any nprobe. With codes, each shard re-scores its own best ``shortlist`` by code score:
    S x shortlist candidates, a superset of one index's ``shortlist``, so the manifest's top k is
    at least as good rank by rank, and not the same (docs/scale.md)."""
    x, q = _corpus(), _corpus(50, seed=7)
    paths = _files(tmp_path, x, [700, 1500, 2300])
    build_ivf(EmbeddingShards(paths), tmp_path / "ivf", nlist=16, dtype="f16", seed=3, pq=pq)
    sharded = ShardedIndex.load(tmp_path / "ivf")
    whole = leanclip.IVFIndex.load(tmp_path / "ivf" / "quantizer.ivf")
    whole.add(np.arange(len(x), dtype=np.uint64), x)
    sharded.nprobe = whole.nprobe = 3
    for index in [*sharded.shards, whole] if pq else []:
        index.shortlist = 10
    got = [sharded.search(v, 10) for v in q]
    one = [whole.search(v, 10) for v in q]
    got_k, one_k = np.stack([g[0] for g in got]), np.stack([o[0] for o in one])
    got_s, one_s = np.stack([g[1] for g in got]), np.stack([o[1] for o in one])
    if pq == 0:
        np.testing.assert_array_equal(got_k, one_k)
        np.testing.assert_array_equal(got_s, one_s)
    else:
        assert np.all(got_s >= one_s) and not np.array_equal(got_s, one_s)
    batch_got, batch_one = sharded.search(q, 10), whole.search(q, 10)  # batches scan rows
    np.testing.assert_array_equal(batch_got[0], batch_one[0])


def test_ivf_build_is_the_same_over_any_number_of_ranks(tmp_path: Path) -> None:
    x = _corpus()
    paths = _files(tmp_path, x, [900, 1800, 2700])
    valid = [np.ones(n, bool) for n in (900, 900, 900, 301)]
    valid[1][[0, 5, 899]] = False
    shards = EmbeddingShards(paths, valid)
    one = build_ivf(shards, tmp_path / "w1", nlist=8, pq=8, dtype="f16", seed=5, chunk=250)
    for rank in range(3):  # three ranks, run one after the other (the barrier is a no-op)
        build_ivf(shards, tmp_path / "w3", nlist=8, pq=8, dtype="f16", seed=5, rank=rank, world_size=3)
    assert one["vectors"] == len(x) - 3
    for name in ["quantizer.ivf", "manifest.json"] + [f"{i:05d}.ivf" for i in range(4)]:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes(), name
    sharded = ShardedIndex.load(tmp_path / "w1")
    assert len(sharded) == len(x) - 3 and 905 not in sharded and 906 in sharded
    # the sample is drawn across every file, seeded
    a, b = shards.sample(500, 1), shards.sample(500, 1)
    assert np.array_equal(a, b) and len(a) >= 497


def test_build_ivf_command_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = _corpus()
    folder = tmp_path / "emb"
    folder.mkdir()
    _files(folder, x, [1500])
    assert build_ivf_cli.main([str(tmp_path / "out"), str(folder), "--nlist", "8", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vectors"] == len(x) and summary["files"] == 2
    np.save(folder / "00002.npy", np.zeros((3, DIM + 1), np.float32))
    assert build_ivf_cli.main([str(tmp_path / "bad"), str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dimension" in err and err.count("\n") == 1
    (folder / "00002.npy").write_bytes(b"not numpy")
    assert build_ivf_cli.main([str(tmp_path / "bad"), str(folder), "--quiet"]) == 2
    assert "00002.npy: not a readable .npy" in capsys.readouterr().err
    with pytest.raises(leanclip.IndexFileError, match="no shard manifest"):
        ShardedIndex.load(tmp_path)
    (tmp_path / "m.json").write_text(
        json.dumps({"format": "leanclip-shards", "kind": "ivf", "shards": [{"file": "../x"}]})
    )
    with pytest.raises(leanclip.IndexFileError, match="bad shard entry"):
        ShardedIndex.load(tmp_path / "m.json")
    with pytest.raises(ShardError, match="disagree"):
        ShardedIndex([leanclip.Index(4), leanclip.Index(8)])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    cuts=st.lists(st.floats(0, 1), max_size=5),
    k=st.integers(1, 40),
    metric=st.sampled_from(["ip", "l2", "cos"]),
    seed=st.integers(0, 2**16),
)
def test_any_split_into_shards_searches_like_one_index(
    n: int, cuts: list[float], k: int, metric: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, 8)).astype(np.float32)  # small integers: many exact ties
    x[np.all(x == 0, axis=1), 0] = 1  # no zero vectors (cos)
    q = rng.integers(-3, 4, size=(9, 8)).astype(np.float32)
    q[np.all(q == 0, axis=1), 1] = 1
    keys = rng.permutation(n).astype(np.uint64) * 3
    one = leanclip.Index(8, metric=metric)
    one.add(keys, x)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    shards = []
    for a, b in zip(bounds, bounds[1:]):
        shard = leanclip.Index(8, metric=metric)
        shard.add(keys[a:b], x[a:b])
        shards.append(shard)
    got, want = ShardedIndex(shards).search(q, k), one.search(q, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
