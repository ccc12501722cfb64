"""IVFIndex files: round trips (read and mmap), every flipped byte and truncation refused,
deferred checksums, foreign and non-regular files, atomic saves, golden files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from leanclip import Index, IndexFileError, IVFIndex
from tests._fixtures_index import assert_same_contents

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "ivf_v1"
HEADER = 128


def make_ivf(metric="cos", dtype="f32", n=60, dim=5, nlist=4, rerank=0, trained=True, seed=0):
    rng = np.random.default_rng(seed)
    index = IVFIndex(dim, metric, dtype, nlist=nlist, nprobe=2, rerank=rerank, seed=seed, train_threshold=0)
    keys = rng.choice(10**9, size=n, replace=False)
    vectors = rng.standard_normal((n, dim))
    index.add(keys, vectors)
    if trained:
        index.train(vectors)
    return index, rng


def same_index(a, b, rng):
    assert (a.nlist, a.nprobe, a.rerank, a.seed, a.train_threshold, a.is_trained) == (
        b.nlist,
        b.nprobe,
        b.rerank,
        b.seed,
        b.train_threshold,
        b.is_trained,
    )
    assert a.list_sizes().tolist() == b.list_sizes().tolist()
    assert_same_contents(a, b, rng)


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
@pytest.mark.parametrize("dtype,rerank", [("f32", 0), ("f16", 0), ("i8", 0), ("f16", 8), ("i8", 8)])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, metric, dtype, rerank, mmap):
    index, rng = make_ivf(metric, dtype, rerank=rerank)
    index.remove(index.keys()[::4])
    path = tmp_path / "a.lcivf"
    index.save(path)
    loaded = IVFIndex.load(path, mmap=mmap)
    assert loaded.read_only is mmap
    same_index(index, loaded, rng)
    loaded.verify()


@pytest.mark.parametrize("trained", [False, True])
def test_empty_and_untrained_round_trip(tmp_path, trained):
    index, rng = make_ivf("l2", "i8", trained=trained)
    index.save(tmp_path / "u")
    same_index(index, IVFIndex.load(tmp_path / "u"), rng)
    IVFIndex(3, "l2", "i8", nlist=2).save(tmp_path / "e")
    for mmap in (False, True):
        e = IVFIndex.load(str(tmp_path / "e"), mmap=mmap)
        assert len(e) == 0 and e.dtype == "i8" and e.nlist == 2 and not e.is_trained
        assert e.search([1.0, 2.0, 3.0])[0].shape == (0,)


def test_mmap_index_is_read_only_and_a_plain_load_is_writable(tmp_path):
    index, _ = make_ivf()
    index.save(tmp_path / "a")
    ro = IVFIndex.load(tmp_path / "a", mmap=True)
    k0 = int(ro.keys()[0])
    for call in (
        lambda: ro.add([1], np.ones((1, 5))),
        lambda: ro.upsert([k0], np.ones((1, 5))),
        lambda: ro.remove([k0]),
        lambda: ro.retrain(),
        lambda: ro.train(np.ones((8, 5))),
    ):
        with pytest.raises(RuntimeError, match="read-only"):
            call()
    ro.nprobe = 4  # a search knob, not a write to the file
    rw = IVFIndex.load(tmp_path / "a")
    rw.add([1], np.ones((1, 5)))
    rw.remove([k0])
    assert len(rw) == len(ro)


def test_overwriting_a_mapped_file_leaves_the_open_map_intact(tmp_path):
    index, rng = make_ivf()
    path = tmp_path / "a"
    index.save(path)
    mapped = IVFIndex.load(path, mmap=True)
    make_ivf(n=9, seed=5)[0].save(path)
    same_index(index, mapped, rng)
    assert len(IVFIndex.load(path)) == 9


@pytest.mark.parametrize("dtype,rerank", [("f32", 0), ("f16", 0), ("i8", 3)])
def test_every_flipped_byte_and_truncation_is_an_indexfileerror(tmp_path, dtype, rerank):
    index, _ = make_ivf("ip", dtype, n=8, dim=3, nlist=2, rerank=rerank)
    path = tmp_path / "a"
    index.save(path)
    data = path.read_bytes()
    bad = tmp_path / "bad"
    cases = [bytes(data[:i]) + bytes([data[i] ^ (1 << (i % 8))]) + data[i + 1 :] for i in range(len(data))]
    cases += [data[:n] for n in sorted({0, 1, 7, 8, 127, 128, 129, len(data) // 2, len(data) - 1})]
    cases += [data + b"\0", data + b"\x01" * 64]
    for case in cases:
        bad.write_bytes(case)
        for mmap in (False, True):
            with pytest.raises(IndexFileError):
                IVFIndex.load(bad, mmap=mmap)


def test_mmap_without_verify_defers_the_vectors_checksum(tmp_path):
    index, _ = make_ivf("ip", "f32", n=10, dim=4, nlist=2)
    path = tmp_path / "a"
    index.save(path)
    good = path.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x10  # inside the vectors
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="vectors checksum"):
        IVFIndex.load(path, mmap=True)
    with pytest.raises(IndexFileError, match="vectors checksum"):
        IVFIndex.load(path)
    lazy = IVFIndex.load(path, mmap=True, verify=False)
    assert len(lazy) == 10
    with pytest.raises(IndexFileError, match="vectors checksum"):
        lazy.verify()
    data = bytearray(good)
    data[HEADER + 20] ^= 1  # a key (after two list sizes): caught without verify
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum"):
        IVFIndex.load(path, mmap=True, verify=False)


def test_foreign_other_version_and_non_regular_files(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    with pytest.raises(IndexFileError, match="not a leanclip IVF"):
        IVFIndex.load(path)
    flat = Index(3)
    flat.add([1], [[1.0, 2.0, 3.0]])
    flat.save(path)  # an exact-index file is refused, and the other way round
    with pytest.raises(IndexFileError):
        IVFIndex.load(path)
    make_ivf()[0].save(path)
    with pytest.raises(IndexFileError):
        Index.load(path)
    data = bytearray(path.read_bytes())
    data[8] = 2
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="version 2"):
        IVFIndex.load(path)
    path.write_bytes(b"")
    with pytest.raises(IndexFileError, match="truncated"):
        IVFIndex.load(path, mmap=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for mmap in (False, True):
        with pytest.raises(IndexFileError, match="not a regular file"):
            IVFIndex.load(fifo, mmap=mmap)
    with pytest.raises(FileNotFoundError):
        IVFIndex.load(tmp_path / "nope")
    with pytest.raises(IsADirectoryError):
        IVFIndex.load(tmp_path)
    with pytest.raises(OSError):
        IVFIndex(2).save(tmp_path / "no-such-dir" / "x")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    index, _ = make_ivf()
    index.save(tmp_path / "a")
    index.save(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


GOLDEN_EXPECTED = json.loads((GOLDEN / "expected.json").read_text())


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("name", sorted(GOLDEN_EXPECTED["files"]))
def test_golden_file_loads_with_recorded_results(name, mmap):
    exp_all = GOLDEN_EXPECTED
    exp = exp_all["files"][name]
    index = IVFIndex.load(GOLDEN / name, mmap=mmap)
    assert (index.dim, index.metric, index.dtype) == (exp_all["dim"], exp["metric"], exp["dtype"])
    assert (index.nlist, index.rerank, index.is_trained) == (exp["nlist"], exp["rerank"], exp["trained"])
    assert index.pq == exp.get("pq", 0)
    assert index.list_sizes().tolist() == exp["list_sizes"]
    assert sorted(int(k) for k in index.keys()) == exp["keys"]
    keys = np.array([int(k) for k in exp["vectors"]], dtype=np.uint64)
    want = np.array(list(exp["vectors"].values()), dtype=np.float32)
    np.testing.assert_allclose(index.get(keys), want, rtol=0, atol=1e-6)
    found, scores = index.search(np.array(exp_all["queries"], np.float32), k=exp_all["k"])
    assert found.tolist() == exp["search_keys"]
    np.testing.assert_allclose(scores, exp["search_scores"], rtol=1e-6, atol=1e-6)


def test_golden_files_cover_every_dtype_and_this_build_writes_version_1(tmp_path):
    assert {e["dtype"] for e in GOLDEN_EXPECTED["files"].values()} == {"f32", "f16", "i8"}
    IVFIndex(3).save(tmp_path / "x")
    data = (tmp_path / "x").read_bytes()
    assert data[:8] == b"LCIVF\0\0\x01" and int.from_bytes(data[8:12], "little") == 1
