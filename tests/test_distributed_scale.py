"""Corpus-scale commands under W gloo processes (``python -m training.scale``) equal one process
exactly, with N and Q not divisible by W and exact ties across the ranks' shares:

* mining, corpus-sharded (query blocks travel the ring) and query-sharded: the rows and scores of
  one ``mine_hard_negatives`` call, for precision f32 / i8 / bf16, metrics ip and l2, k above a
  rank's share of the corpus;
* the IVF build from embedding files: byte-identical files for any number of ranks;
* batch search where each rank holds some of 4 shard files: one index's results (exact shards,
  and IVF shards at nprobe = nlist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._fixtures_scale import check, launch_scale
from tests._fixtures_training import require_engine

leanclip = require_engine()

from leanclip.shards import EmbeddingShards, build_exact, build_ivf  # noqa: E402
from training import scale  # noqa: E402
from training.distributed import DistInfo  # noqa: E402

N, Q, DIM, K, BLOCK = 1001, 203, 24, 7, 50
MINE_RUNS = {  # name: extra argv
    "f32": ["--precision", "f32"],
    "i8": ["--precision", "i8"],
    "bf16": ["--precision", "bf16"],
    "l2": ["--metric", "l2"],
    "query_i8": ["--layout", "query", "--precision", "i8"],
    "i8_scan_rows": ["--precision", "i8", "--scan-rows", "37"],  # each rank's rows in several calls
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(N, DIM)).astype(np.float32)
    corpus[500:540] = corpus[0:40]  # exact ties, across the ranks' shares
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.normal(size=(Q, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cg, qg = rng.integers(0, 40, N), rng.integers(0, 40, Q)
    np.save(root / "c0.npy", corpus[:600])  # a rank's share may span two files
    np.save(root / "c1.npy", corpus[600:])
    np.save(root / "q.npy", queries)
    np.save(root / "cg.npy", cg)
    np.save(root / "qg.npy", qg)
    four = root / "four"
    four.mkdir()
    for i, (a, b) in enumerate([(0, 250), (250, 251), (251, 777), (777, N)]):
        np.save(four / f"{i:05d}.npy", corpus[a:b])
    shards = EmbeddingShards(sorted(four.glob("*.npy")))
    build_ivf(shards, root / "ivf1", nlist=12, dtype="f32", seed=2, pq=4)  # the 1-process build
    build_exact(shards, root / "exact", metric="ip")
    build_exact(
        EmbeddingShards([root / "c0.npy", root / "c1.npy"]), root / "two", metric="ip"
    )  # ranks 2, 3 hold none
    return {"root": root, "corpus": corpus, "queries": queries, "cg": cg, "qg": qg}


def _commands(data: dict[str, Any], out: Path) -> list[list[str]]:
    r = data["root"]
    base = [
        "mine",
        "--queries",
        str(r / "q.npy"),
        "--corpus",
        str(r / "c0.npy"),
        str(r / "c1.npy"),
        "--k",
        str(K),
    ]
    groups = [
        "--query-groups",
        str(r / "qg.npy"),
        "--corpus-groups",
        str(r / "cg.npy"),
        "--block",
        str(BLOCK),
    ]
    cmds = [base + groups + extra + ["--out", str(out / name)] for name, extra in MINE_RUNS.items()]
    cmds.append(base[:-1] + ["600", "--block", "64", "--out", str(out / "big_k")])  # k > a rank's rows
    cmds.append(
        [
            "build-ivf",
            str(out / "ivf"),
            str(r / "four"),
            "--nlist",
            "12",
            "--dtype",
            "f32",
            "--seed",
            "2",
            "--pq",
            "4",
        ]
    )
    q = str(r / "q.npy")
    cmds.append(
        [
            "search",
            str(r / "ivf1"),
            "--queries",
            q,
            "--k",
            "10",
            "--nprobe",
            "12",
            "--out",
            str(out / "ivf_hits.npz"),
        ]
    )
    cmds.append(
        ["search", str(r / "exact"), "--queries", q, "--k", "10", "--out", str(out / "exact_hits.npz")]
    )
    cmds.append(["search", str(r / "two"), "--queries", q, "--k", "10", "--out", str(out / "two_hits.npz")])
    return cmds


def _parts(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = sorted((np.load(p) for p in folder.glob("part-*.npz")), key=lambda p: int(p["query_start"]))
    return np.concatenate([p["rows"] for p in parts]), np.concatenate([p["scores"] for p in parts])


def _reference(data: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    q, c = data["queries"], data["corpus"]
    if name == "big_k":
        return leanclip.mine_hard_negatives(q, c, 600)
    kw: dict[str, Any] = {"query_groups": data["qg"], "corpus_groups": data["cg"]}
    if name == "l2":
        kw["metric"] = "l2"
    else:
        kw["precision"] = name.removeprefix("query_").removesuffix("_scan_rows")
    return leanclip.mine_hard_negatives(q, c, K, **kw)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_w_processes_equal_one_process(data: dict[str, Any], world_size: int) -> None:
    out = data["root"] / f"w{world_size}"
    check(launch_scale(world_size, _commands(data, out), out))
    for name in [*MINE_RUNS, "big_k"]:
        rows, scores = _parts(out / name)
        ref_rows, ref_scores = _reference(data, name)
        assert rows.shape == (Q, ref_rows.shape[1]), name
        np.testing.assert_array_equal(rows, ref_rows, err_msg=name)
        np.testing.assert_array_equal(scores, ref_scores, err_msg=name)
    # the tied rows 0..39 / 500..539 do come back together (ties by row)
    f32_rows, _ = _parts(out / "f32")
    assert np.isin(f32_rows, np.arange(40)).any() and np.isin(f32_rows, np.arange(500, 540)).any()
    for name in ["quantizer.ivf", "manifest.json"] + [f"{i:05d}.ivf" for i in range(4)]:
        assert (out / "ivf" / name).read_bytes() == (data["root"] / "ivf1" / name).read_bytes(), name
    one = leanclip.Index(DIM, metric="ip")
    one.add(np.arange(N, dtype=np.uint64), data["corpus"])
    keys, scores = one.search(data["queries"], 10)
    for hits in ("ivf_hits", "exact_hits", "two_hits"):
        got = np.load(out / f"{hits}.npz")
        np.testing.assert_array_equal(got["keys"], keys, err_msg=hits)
        np.testing.assert_allclose(got["scores"], scores, rtol=1e-5, atol=1e-6, err_msg=hits)


def test_in_memory_mining_in_one_process_is_the_engine_call(data: dict[str, Any]) -> None:
    """W = 1: both layouts of ``scale.mine`` are the engine's call, blocks and all."""
    import torch

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    ref = _reference(data, "i8")
    for layout in scale.LAYOUTS:
        rows, scores = scale.mine(
            data["queries"], data["corpus"], K, info, data["qg"], data["cg"], layout=layout, precision="i8"
        )
        np.testing.assert_array_equal(rows, ref[0])
        np.testing.assert_array_equal(scores, ref[1])
    rows, _ = scale.mine_corpus_sharded(
        data["queries"], data["corpus"], 0, K, info, data["qg"], data["cg"], block=17, precision="i8"
    )
    np.testing.assert_array_equal(rows, ref[0])
    with pytest.raises(ValueError, match="layout must be one of"):
        scale.mine(data["queries"], data["corpus"], K, info, layout="rows")


@pytest.mark.parametrize(
    "engine", [{"precision": "i8"}, {"precision": "bf16"}, {"dtype": "i8"}, {"dtype": "f16", "metric": "l2"}]
)
@pytest.mark.parametrize("scan_rows", [1, 37, 600])
def test_rows_mined_in_several_engine_calls_equal_one_call(
    data: dict[str, Any], engine: dict[str, str], scan_rows: int
) -> None:
    """A rank's rows mined ``scan_rows`` at a time (its copy for the scan bounded) and merged give
    one call's rows and scores, ties included; the default splits where the engine copies."""
    import torch

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    q, c, qg, cg = data["queries"], data["corpus"], data["qg"], data["cg"]
    ref = leanclip.mine_hard_negatives(q, c, K, query_groups=qg, corpus_groups=cg, **engine)  # type: ignore[arg-type]
    rows, scores = scale.mine_corpus_sharded(
        q, c, 0, K, info, qg, cg, block=64, scan_rows=scan_rows, **engine
    )
    np.testing.assert_array_equal(rows, ref[0])
    np.testing.assert_array_equal(scores, ref[1])
    assert scale._scan_rows(100_000, "f32", "f32") == 100_000
    assert scale._scan_rows(50_000, "f32", "i8") == scale.SCAN_MIN_ROWS
    assert scale._scan_rows(1_000_000, "f32", "bf16") == 62_500


def test_command_errors_are_one_line(data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    r = data["root"]
    assert (
        scale.main(
            ["mine", "--queries", str(r / "nope.npy"), "--corpus", str(r / "c0.npy"), "--out", str(r / "x")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.npy: no such embedding file" in err and err.count("\n") == 1
    assert scale.main(["search", str(r), "--queries", str(r / "q.npy"), "--out", str(r / "h.npz")]) == 2
    assert "no shard manifest" in capsys.readouterr().err
