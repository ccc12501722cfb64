"""Index files: round trips, mmap, corruption of any byte, atomic save under SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from leanclip import Index, IndexFileError
from tests._fixtures_index import assert_same_contents

HEADER = 64


def make_index(metric="cos", dtype="f32", n=40, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    index = Index(dim, metric, dtype)
    keys = rng.choice(10**9, size=n, replace=False)
    index.add(keys, rng.standard_normal((n, dim)))
    return index, rng


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, metric, dtype, mmap):
    index, rng = make_index(metric, dtype)
    index.remove(index.keys()[::4])
    path = tmp_path / "a.lcx"
    index.save(path)
    loaded = Index.load(path, mmap=mmap)
    assert loaded.read_only is mmap
    assert_same_contents(index, loaded, rng)
    if mmap:
        loaded.verify()


def test_empty_index_round_trip(tmp_path):
    Index(3, "l2", "i8").save(tmp_path / "e")
    for mmap in (False, True):
        loaded = Index.load(str(tmp_path / "e"), mmap=mmap)
        assert len(loaded) == 0 and loaded.dtype == "i8" and loaded.metric == "l2"
        assert loaded.search([1.0, 2.0, 3.0])[0].shape == (0,)


def test_mmap_index_is_read_only(tmp_path):
    index, _ = make_index()
    index.save(tmp_path / "a")
    ro = Index.load(tmp_path / "a", mmap=True)
    before = ro.keys().tolist()
    for call in (
        lambda: ro.add([1], np.ones((1, 5))),
        lambda: ro.upsert([int(before[0])], np.ones((1, 5))),
        lambda: ro.remove([int(before[0])]),
    ):
        with pytest.raises(RuntimeError, match="read-only"):
            call()
    assert ro.keys().tolist() == before
    # a writable copy: load without mmap
    rw = Index.load(tmp_path / "a")
    rw.add([1], np.ones((1, 5)))
    assert len(rw) == len(ro) + 1


def test_overwriting_a_mapped_file_leaves_the_open_map_intact(tmp_path):
    index, rng = make_index()
    path = tmp_path / "a"
    index.save(path)
    mapped = Index.load(path, mmap=True)
    other, _ = make_index(n=3, seed=5)
    other.save(path)
    assert_same_contents(index, mapped, rng)
    assert len(Index.load(path)) == 3


def _variants(data: bytes):
    yield "truncated", [data[:n] for n in sorted({0, 1, 7, 8, 63, 64, 65, len(data) // 2, len(data) - 1})]
    yield "extended", [data + b"\0", data + b"\x01" * 64]


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
def test_every_flipped_byte_and_truncation_is_an_indexfileerror(tmp_path, dtype):
    index, _ = make_index("ip", dtype, n=6, dim=3)
    path = tmp_path / "a"
    index.save(path)
    data = path.read_bytes()
    bad = tmp_path / "bad"
    cases = [bytes(data[:i]) + bytes([data[i] ^ (1 << (i % 8))]) + data[i + 1 :] for i in range(len(data))]
    for _, extra in _variants(data):
        cases += extra
    for case in cases:
        bad.write_bytes(case)
        for mmap in (False, True):
            with pytest.raises(IndexFileError):
                Index.load(bad, mmap=mmap)


def test_mmap_without_verify_defers_the_vectors_checksum(tmp_path):
    index, _ = make_index("ip", "f32", n=10, dim=4)
    path = tmp_path / "a"
    index.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the vectors
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="vectors checksum"):
        Index.load(path, mmap=True)
    with pytest.raises(IndexFileError, match="vectors checksum"):
        Index.load(path)
    lazy = Index.load(path, mmap=True, verify=False)
    assert len(lazy) == 10
    with pytest.raises(IndexFileError, match="vectors checksum"):
        lazy.verify()
    # a flipped key is caught even without verify
    data = bytearray(index_bytes(tmp_path, index))
    data[HEADER + 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum"):
        Index.load(path, mmap=True, verify=False)


def index_bytes(tmp_path: Path, index) -> bytes:
    p = tmp_path / "tmp-copy"
    index.save(p)
    return p.read_bytes()


def test_foreign_and_other_version_files(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(IndexFileError, match="not a leanclip index"):
        Index.load(path)
    path.write_bytes(b"")
    with pytest.raises(IndexFileError, match="truncated"):
        Index.load(path, mmap=True)
    index, _ = make_index(n=2)
    data = bytearray(index_bytes(tmp_path, index))
    data[8] = 2  # format version 2
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="version 2"):
        Index.load(path)


def test_missing_file_and_bad_directory_are_oserrors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Index.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        Index.load(tmp_path / "nope", mmap=True)
    with pytest.raises(OSError):
        Index(2).save(tmp_path / "no-such-dir" / "x")


def test_save_leaves_no_temporary_files(tmp_path):
    index, _ = make_index()
    index.save(tmp_path / "a")
    index.save(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


SAVER = textwrap.dedent(
    """
    import sys, numpy as np
    from leanclip import Index
    path, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 64)).astype(np.float32)
    small = Index(64, "ip"); small.add(np.arange(10), vectors[:10])
    big = Index(64, "ip"); big.add(np.arange(n), vectors)
    small.save(path)
    print("ready", flush=True)
    while True:  # alternate between two states until killed
        big.save(path)
        small.save(path)
    """
)


@pytest.mark.slow
def test_a_process_killed_mid_save_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "index.lcx"
    n = 200_000  # ~51 MB per save: a kill lands mid-write most of the time
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path), str(n)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        rng = np.random.default_rng(1)
        for _ in range(6):
            time.sleep(float(rng.uniform(0.05, 0.4)))
            loaded = Index.load(path)  # readers never see a partial file
            assert len(loaded) in (10, n)
        time.sleep(float(rng.uniform(0.05, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for mmap in (False, True):
        loaded = Index.load(path, mmap=mmap)
        assert len(loaded) in (10, n)
        np.testing.assert_array_equal(np.sort(loaded.keys()), np.arange(len(loaded)))
    leftovers = [p for p in tmp_path.iterdir() if p.name != path.name]
    # a killed save may leave its temporary file behind, never a damaged index
    assert all(p.name.startswith(".index.lcx.") and p.name.endswith(".tmp") for p in leftovers)
