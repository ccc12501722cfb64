"""Golden index files (tests/data/golden/v<N>/, written by tests/data/make_golden.py): every
committed format version loads in this build with the recorded contents and search results, or
is refused with IndexFileError naming both versions; a file claiming another version is refused."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import leanclip

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
CURRENT = 1  # the format version this build writes (checked below against a fresh save)
VERSION_DIRS = sorted(p for p in GOLDEN.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name))
CASES = [(d, name) for d in VERSION_DIRS for name in json.loads((d / "expected.json").read_text())["files"]]


def test_golden_files_exist_for_every_dtype_and_metric():
    assert [d.name for d in VERSION_DIRS] == ["v1"]
    names = set(json.loads((GOLDEN / "v1" / "expected.json").read_text())["files"])
    for dtype in ("f32", "f16", "i8"):
        for metric in ("cos", "ip", "l2"):
            assert f"{dtype}_{metric}.lcx" in names


def test_this_build_writes_the_current_version(tmp_path):
    p = tmp_path / "x.lcx"
    leanclip.Index(3).save(str(p))
    assert p.read_bytes()[:8] == b"LEANCLIP"
    assert int.from_bytes(p.read_bytes()[8:12], "little") == CURRENT


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("vdir,name", CASES, ids=[f"{d.name}/{n}" for d, n in CASES])
def test_golden_file_loads_with_recorded_results(vdir, name, mmap):
    exp_all = json.loads((vdir / "expected.json").read_text())
    exp = exp_all["files"][name]
    version = exp_all["format_version"]
    path = vdir / name
    if version != CURRENT:  # an older (or newer) version: must be refused, naming both
        with pytest.raises(leanclip.IndexFileError, match=rf"version {version}\b.*version {CURRENT}\b"):
            leanclip.Index.load(str(path), mmap=mmap)
        return
    index = leanclip.Index.load(str(path), mmap=mmap)
    assert (index.dim, index.metric, index.dtype) == (exp_all["dim"], exp["metric"], exp["dtype"])
    assert len(index) == len(exp["keys"])
    assert sorted(int(k) for k in index.keys()) == exp["keys"]
    if exp["keys"]:
        keys = np.array([int(k) for k in exp["vectors"]], dtype=np.uint64)
        want = np.array(list(exp["vectors"].values()), dtype=np.float32)
        np.testing.assert_allclose(index.get(keys), want, rtol=0, atol=1e-6)
    queries = np.array(exp_all["queries"], dtype=np.float32)
    keys, scores = index.search(queries, k=exp_all["k"])
    assert keys.astype(np.uint64).tolist() == exp["search_keys"]
    np.testing.assert_allclose(
        scores, np.array(exp["search_scores"], dtype=np.float32).reshape(scores.shape), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("claimed", [0, 2, 7, 2**32 - 1])
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_other_version_is_refused_naming_both(tmp_path, claimed, mmap):
    data = bytearray((GOLDEN / "v1" / "f32_cos.lcx").read_bytes())
    data[8:12] = claimed.to_bytes(4, "little")
    p = tmp_path / "other.lcx"
    p.write_bytes(bytes(data))
    with pytest.raises(leanclip.IndexFileError) as info:
        leanclip.Index.load(str(p), mmap=mmap)
    msg = str(info.value)
    assert re.search(rf"version {claimed}\b", msg), msg
    assert re.search(rf"version {CURRENT}\b", msg), msg
    assert str(p) in msg or p.name in msg, msg


def test_generator_reproduces_the_current_files(tmp_path):
    # The script regenerates the current version's files: same headers (magic, version, dim,
    # dtype, metric, count) and keys, vectors equal up to float rounding (the engine may change
    # how it normalizes or quantizes by an ulp without changing the format).
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN.parent / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(tmp_path)
    assert out.name == f"v{CURRENT}"
    committed = GOLDEN / out.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in committed.iterdir())
    for f in sorted(committed.glob("*.lcx")):
        fresh = (out / f.name).read_bytes()
        assert fresh[:48] == f.read_bytes()[:48], f"{f.name}: header differs from a fresh write"
        a, b = leanclip.Index.load(str(f)), leanclip.Index.load(str(out / f.name))
        assert a.keys().tolist() == b.keys().tolist()
        if len(a):
            np.testing.assert_allclose(a.get(a.keys()), b.get(a.keys()), rtol=0, atol=1e-5)
