"""Single queries that scan as batches do (`IVFIndex.single_scan = "product"`): each probed
list by the i8 product over its packed copy (and `scan_dims` directions), then the best
re-scored from the rows; `tune` chooses it where it reads fewer bytes than rows or codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.data.shapes import generate
from leanclip import IndexFileError, IVFIndex
from tests._fixtures_index import exact_top, recall

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "ivf_v1"
K = 10


@pytest.fixture(scope="module")
def powerlaw():
    base, queries = generate("powerlaw", 20_000, 1300, seed=0)
    return base, queries[:1000], queries[1000:]


def build(base: np.ndarray, **kw) -> IVFIndex:
    index = IVFIndex(base.shape[1], "ip", train_threshold=0, **kw)
    index.add(np.arange(len(base), dtype=np.uint64), base)
    index.train(base)
    return index


def test_a_single_query_scanning_by_the_product_reports_what_a_batch_reports(powerlaw):
    base, held, _ = powerlaw
    index = build(base, pq=0)
    assert index.scan_dims > 0 and index.single_scan == "rows"
    index.nprobe = 12
    index.single_scan = "product"
    assert index.single_scan == "product" and "single_scan='product'" in repr(index)
    qs = held[:200]
    batch_keys, batch_scores = index.search(qs, k=K)
    same = 0
    for q, bk, bs in zip(qs, batch_keys, batch_scores):
        keys, scores = index.search(q, k=K)
        assert np.all(np.diff(scores) <= 0)
        # A key's score is the same alone or in a batch (both re-score from the rows).
        common = {int(k): float(s) for k, s in zip(bk, bs)}
        for k, s in zip(keys, scores):
            if int(k) in common:
                assert s == common[int(k)]
        same += set(map(int, keys)) == set(common)
    # The same lists and the same ranking: the answers agree but for the rare query whose
    # probed lists or i8 rounding differ between a query alone and in a batch.
    assert same >= 190, same
    truth = exact_top(base, qs)
    single = np.stack([index.search(q, k=K)[0] for q in qs])
    assert abs(recall(single, truth) - recall(batch_keys, truth)) <= 0.01
    # Every list scanned: close to exact (the product ranks, the rows re-score k + 64).
    index.nprobe = index.nlist
    single = np.stack([index.search(q, k=K)[0] for q in qs])
    assert recall(single, truth) >= 0.99


def test_single_scan_is_saved_and_files_written_before_scan_rows_or_codes(powerlaw, tmp_path):
    base, held, _ = powerlaw
    index = build(base[:5000], pq=0)
    index.single_scan = "product"
    index.save(tmp_path / "p.lcivf")
    back = IVFIndex.load(tmp_path / "p.lcivf")
    assert back.single_scan == "product"
    np.testing.assert_array_equal(back.search(held[0], k=K)[0], index.search(held[0], k=K)[0])
    # Back to the rows: the file says so again, byte 89 zero as before.
    back.single_scan = "rows"
    back.save(tmp_path / "r.lcivf")
    assert IVFIndex.load(tmp_path / "r.lcivf").single_scan == "rows"
    assert (tmp_path / "r.lcivf").read_bytes()[89] == 0
    assert (tmp_path / "p.lcivf").read_bytes()[89] == 1
    for path in sorted(GOLDEN.glob("*.lcivf")):
        old = IVFIndex.load(path)
        assert old.single_scan == ("codes" if old.pq else "rows"), path.name


def _xxh3(b: bytes) -> int:
    # the system libxxhash computes the format's XXH3-64 (as in test_fuzz_files.py)
    import ctypes

    f = ctypes.CDLL("libxxhash.so.0").XXH3_64bits
    f.restype, f.argtypes = ctypes.c_uint64, [ctypes.c_char_p, ctypes.c_size_t]
    return f(b, len(b))


def test_a_single_scan_byte_other_than_0_or_1_is_a_corrupt_header(tmp_path):
    small = IVFIndex(4, "ip", "f32", nlist=4)
    small.add(np.arange(4, dtype=np.uint64), np.eye(4, dtype=np.float32))
    small.save(tmp_path / "s.lcivf")
    raw = bytearray((tmp_path / "s.lcivf").read_bytes())
    assert raw[89] == 0
    # Untrained f32: one list size and 4 keys after the 128-byte header, then the vectors at
    # the next multiple of 64; the header checksum covers bytes 0..120 and 128 up to them.
    vectors = (128 + 8 + 8 * 4 + 63) // 64 * 64
    for value, ok in ((1, True), (2, False), (255, False)):
        raw[89] = value
        raw[120:128] = _xxh3(bytes(raw[:120]) + bytes(raw[128:vectors])).to_bytes(8, "little")
        (tmp_path / "b.lcivf").write_bytes(bytes(raw))
        if ok:
            IVFIndex.load(tmp_path / "b.lcivf")  # f32 cannot scan by the product: rows still
            assert IVFIndex.load(tmp_path / "b.lcivf").single_scan == "rows"
        else:
            with pytest.raises(IndexFileError, match="single-query scan"):
                IVFIndex.load(tmp_path / "b.lcivf")


def test_single_scan_refuses_what_the_index_cannot_do():
    f32 = IVFIndex(32, "ip", "f32", nlist=4)
    with pytest.raises(ValueError, match="packed copy smaller than the rows"):
        f32.single_scan = "product"
    l2 = IVFIndex(32, "l2", "f16", nlist=4)
    with pytest.raises(ValueError, match="cos / ip"):
        l2.single_scan = "product"
    with pytest.raises(ValueError, match='"codes" needs pq > 0'):
        f32.single_scan = "codes"
    coded = IVFIndex(32, "ip", "f16", nlist=4, pq=8)
    with pytest.raises(ValueError, match="this index has codes"):
        coded.single_scan = "rows"
    with pytest.raises(ValueError, match="must be"):
        f32.single_scan = "graph"
    assert f32.single_scan == "rows" and coded.single_scan == "rows"  # untrained: no codes yet


@pytest.mark.parametrize("shape", ["powerlaw", "neardup"])
def test_tune_chooses_the_product_scan_where_it_reads_less_and_lands_on_target(shape):
    base, queries = generate(shape, 20_000, 1000, seed=0)
    truth = exact_top(base, queries)
    index = build(base)
    for target in (0.9, 0.95):
        report = index.tune(target, k=K)
        assert report["single_scan"] == "product" == index.single_scan, report
        assert report["recall_single"] >= target
        assert report["shortlist"] is None and index.pq == 0  # the automatic codes went
        got1 = recall(np.stack([index.search(q, k=K)[0] for q in queries[:400]]), truth[:400])
        # 400 held-out queries (about +-0.015 at 0.9), the tuning sample's own spread and the
        # step of one probe.
        assert abs(got1 - target) <= 0.035, (shape, target, got1, report)
