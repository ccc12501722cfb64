"""From one machine to a cluster (docs/scale.md): corpus-sharded mining, the streaming embedding
job, IVF built from shards and searched through mmap, and sharded search, with W gloo processes
on this machine.

Parts (``LEANCLIP_BENCH_SCALE_PARTS``, comma-separated; default all): ``equality`` (mining at
W = 1..4, N and Q not divisible by W, against one engine call), ``mining`` (200k x 512 corpus,
W = 1, 2, 4: time, per-rank peak RSS against corpus/W + one query block;
``LEANCLIP_BENCH_SCALE_MINING_PRECISIONS``, default ``f32,i8``, reruns some precisions and keeps
the stored rows of the others), ``search`` (4 shard
files against one index), ``embed`` (12-megapixel JPEGs, shard sizes 100 and
``LEANCLIP_BENCH_SCALE_EMBED_BIG``, default 10,000), ``ivf`` (``LEANCLIP_BENCH_SCALE_IVF_N``
vectors, default 10M x 128 f16 with 4-bit codes, built from 500k-row files by
``python -m leanclip.build_ivf``: peak RSS against the files' size, recall through mmap against
an in-memory index built with the same settings), ``serve`` (RSS of IVF shard files served
through mmap as searches touch more lists, ``LEANCLIP_BENCH_SCALE_SERVE_N``, default 2M). Each
part's table is kept in
``results/scale.parts.json`` with its own date and load, so parts can be rerun alone; the
markdown shows every part last measured. W processes are started by ``torch.distributed.run``
(torchrun) with ``RAYON_NUM_THREADS`` = cores / W.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from benchmarks import _harness as H
from training.report import cpu_model, markdown_table

ROOT = Path(__file__).resolve().parent.parent
PARTS_FILE = H.RESULTS / "scale.parts.json"
CORES = os.cpu_count() or 1


def _env(threads: int) -> Dict[str, str]:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def torchrun(world: int, argv: Sequence[str]) -> Dict[str, Any]:
    """``torchrun --nproc_per_node world -m training.scale argv``: rank 0's JSON summary (with
    every rank's seconds and RSS) and the launch's wall time."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "training.scale", *argv,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=_env(max(1, CORES // world)), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    summary["wall"] = wall
    return summary


def run_peak(
    module: str,
    argv: Sequence[str],
    threads: int = CORES,
    preload: str = "numpy",
    watch: Callable[[int], Any] | None = None,
    every: float = 60.0,
) -> Dict[str, Any]:
    """``module.main(argv)`` in a fresh process: its return code, seconds, RSS after importing it
    and ``preload`` (e.g. torch, which the module imports lazily), and peak RSS (VmHWM), in MiB.
    ``watch(pid)`` is called every ``every`` seconds while it runs; what it returns is kept in
    ``samples``."""
    code = (
        "import importlib, json, sys, time\n"
        "def rss(f):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f + ':')) / 1024\n"
        f"m = importlib.import_module({module!r}); import leanclip._engine, {preload}\n"
        "start, t = rss('VmRSS'), time.perf_counter()\n"
        f"rc = m.main({list(argv)!r})\n"
        "print('@@' + json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'start': start, 'peak': rss('VmHWM')}))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    samples = []
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=every if watch else None)
            break
        except subprocess.TimeoutExpired:  # retrying loses no output
            samples.append(watch(proc.pid))  # type: ignore[misc]
    lines = [line for line in stdout.splitlines() if line.startswith("@@")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{module} {argv} failed:\n{stderr[-3000:]}")
    return {**json.loads(lines[-1][2:]), "samples": samples}


def _unit(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray | None = None) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if centres is not None:
        x *= 0.35
        x += centres[rng.integers(0, len(centres), n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _parts(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = sorted((np.load(p) for p in folder.glob("part-*.npz")), key=lambda p: int(p["query_start"]))
    return np.concatenate([p["rows"] for p in parts]), np.concatenate([p["scores"] for p in parts])


def _mine_argv(tmp: Path, out: Path, precision: str, block: int, k: int = 10) -> List[str]:
    return [
        "mine", "--queries", str(tmp / "q.npy"), "--corpus", str(tmp / "c0.npy"), str(tmp / "c1.npy"),
        "--query-groups", str(tmp / "qg.npy"), "--corpus-groups", str(tmp / "cg.npy"), "--k", str(k),
        "--precision", precision, "--block", str(block), "--out", str(out),
    ]  # fmt: skip


def _mining_data(
    tmp: Path, q: int, n: int, dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    corpus, queries = _unit(rng, n, dim), _unit(rng, q, dim)
    cg, qg = np.arange(n) // 5, rng.integers(0, n // 5, q)  # groups of 5, as COCO captions
    split = n * 3 // 5
    np.save(tmp / "c0.npy", corpus[:split])
    np.save(tmp / "c1.npy", corpus[split:])
    np.save(tmp / "q.npy", queries)
    np.save(tmp / "cg.npy", cg)
    np.save(tmp / "qg.npy", qg)
    return queries, corpus, qg, cg


# ----------------------------------------------------------------------------- parts


def part_equality(tmp: Path) -> Dict[str, Any]:
    import leanclip

    q, n, dim = 3001, 30001, 512
    queries, corpus, qg, cg = _mining_data(tmp, q, n, dim)
    rows = []
    for precision in ("f32", "i8"):
        ref = leanclip.mine_hard_negatives(
            queries, corpus, 10, query_groups=qg, corpus_groups=cg, precision=precision
        )
        for world in (1, 2, 3, 4):
            out = tmp / f"eq-{precision}-{world}"
            summary = torchrun(world, _mine_argv(tmp, out, precision, 500))
            got = _parts(out)
            same = np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
            rows.append(
                [
                    precision,
                    world,
                    f"{max(r['seconds'] for r in summary['ranks']):.2f}",
                    "yes" if same else "NO",
                ]
            )
    return {
        "title": f"Mining equal to one process ({q:,} queries x {n:,} corpus rows, dim {dim}, top-10, groups of 5)",
        "header": ["precision", "W", "mining s (slowest rank)", "ids and scores equal to one engine call"],
        "rows": rows,
    }


def part_mining(tmp: Path) -> Dict[str, Any]:
    import leanclip

    q = int(os.environ.get("LEANCLIP_BENCH_SCALE_MINING_Q", "8000"))
    precisions = [
        p for p in os.environ.get("LEANCLIP_BENCH_SCALE_MINING_PRECISIONS", "f32,i8").split(",") if p
    ]
    run_date = _now_and_load()
    n, dim, block = 200_000, 512, 2048
    queries, corpus, qg, cg = _mining_data(tmp, q, n, dim)
    corpus_mib, block_mib = corpus.nbytes / 2**20, block * dim * 4 / 2**20
    rows = []
    for precision in precisions:
        started = time.perf_counter()
        ref = leanclip.mine_hard_negatives(
            queries, corpus, 10, query_groups=qg, corpus_groups=cg, precision=precision
        )
        one_call = time.perf_counter() - started
        base = None
        for world in (1, 2, 4):
            out = tmp / f"m-{precision}-{world}"
            summary = torchrun(world, _mine_argv(tmp, out, precision, block))
            got = _parts(out)
            same = np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
            secs = max(r["seconds"] for r in summary["ranks"])
            base = base or secs
            extra = max(r["peak_rss_mib"] - r["start_rss_mib"] for r in summary["ranks"])
            budget = 1.2 * (corpus_mib / world + block_mib)
            rows.append(
                [
                    precision, world, f"{secs:.1f}", f"{summary['wall']:.1f}", f"{base / secs:.2f}x",
                    f"{extra:.0f}", f"{budget:.0f}", "yes" if extra <= budget else "NO", "yes" if same else "NO",
                    f"{one_call:.1f}",
                ]
            )  # fmt: skip
    return _keep_other_rows(
        "mining",
        {
            "title": f"Corpus-sharded mining, {q:,} queries x {n:,} corpus rows x {dim} (f32, {corpus_mib:.0f} MiB), "
            f"top-10, query block {block} ({block_mib:.0f} MiB)",
            "header": [
                "precision",
                "W",
                "mining s (slowest rank)",
                "torchrun wall s",
                "throughput vs W=1",
                "per-rank peak RSS beyond start, MiB (max)",
                "budget 1.2 x (corpus/W + block), MiB",
                "within",
                "equal to 1 process",
                "one engine call s",
            ],  # fmt: skip
            "rows": rows,
            "note": "Per-rank RSS beyond start = VmHWM - VmRSS when the command starts (torch, leanclip and "
            "the process group already loaded); the rank's corpus rows are read through mmap and count once "
            "touched. RAYON_NUM_THREADS = cores / W.",
        },
        run_date,
    )


def _keep_other_rows(name: str, result: Dict[str, Any], started: str) -> Dict[str, Any]:
    """``result`` with the stored part's rows of other precisions (first column) kept, when the
    stored part has the same title: a rerun of some precisions
    (``LEANCLIP_BENCH_SCALE_MINING_PRECISIONS``) replaces only their rows. ``runs`` dates each
    precision's rows (``started``: this run's date and load); the note names them when they
    differ."""
    stored = json.loads(PARTS_FILE.read_text()).get(name) if PARTS_FILE.is_file() else None
    measured = {r[0] for r in result["rows"]}
    result["runs"] = {p: started for p in measured}
    if not stored or stored["title"] != result["title"]:
        return result
    kept = [r for r in stored["rows"] if r[0] not in measured]
    for r in kept:
        result["runs"][r[0]] = stored.get("runs", {}).get(
            r[0], f"{stored['date']}, load at the start {stored['load']}"
        )
    result["rows"] = sorted(kept + result["rows"], key=lambda r: (["f32", "bf16", "i8"].index(r[0]), r[1]))
    if len(set(result["runs"].values())) > 1:
        result["note"] += (
            " Rows measured in separate runs: "
            + "; ".join(f"{p}: {when}" for p, when in sorted(result["runs"].items()))
            + "."
        )
    return result


def part_search(tmp: Path) -> Dict[str, Any]:
    import leanclip
    from leanclip.shards import EmbeddingShards, ShardedIndex, build_exact, build_ivf

    rng = np.random.default_rng(5)
    n, dim = 100_003, 128
    centres = rng.standard_normal((256, dim), dtype=np.float32)
    x = _unit(rng, n, dim, centres)
    q = _unit(rng, 500, dim, centres)
    cuts = [0, 20_000, 45_001, 80_000, n]
    paths = []
    for i in range(4):
        paths.append(tmp / f"s{i}.npy")
        np.save(paths[-1], x[cuts[i] : cuts[i + 1]])
    shards = EmbeddingShards(paths)
    build_exact(shards, tmp / "exact")
    build_ivf(shards, tmp / "ivf", nlist=64, dtype="f32", seed=1)
    one = leanclip.Index(dim, metric="ip")
    one.add(np.arange(n, dtype=np.uint64), x)
    whole = leanclip.IVFIndex.load(tmp / "ivf" / "quantizer.ivf")
    whole.add(np.arange(n, dtype=np.uint64), x)
    whole.nprobe = 64
    rows = []
    for name, folder, ref in (("exact", "exact", one), ("IVF, nprobe = nlist = 64", "ivf", whole)):
        sharded = ShardedIndex.load(tmp / folder, mmap=True)
        if name != "exact":
            sharded.nprobe = 64
        got, want = sharded.search(q, 10), ref.search(q, 10)
        t_sharded = H.timeit(lambda s=sharded: s.search(q, 10), repeat=3)
        t_one = H.timeit(lambda r=ref: r.search(q, 10), repeat=3)
        same = np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        exact_keys = np.array_equal(got[0], one.search(q, 10)[0])
        rows.append(
            [
                name,
                "yes" if same else "NO",
                "yes" if exact_keys else "NO",
                f"{t_sharded * 1e3:.0f}",
                f"{t_one * 1e3:.0f}",
            ]
        )
    return {
        "title": f"Four shard files searched as one ({n:,} x {dim}, shards of 20,000 / 25,001 / 34,999 / 20,003; 500 queries, top-10)",
        "header": [
            "shards",
            "keys and scores equal to one index",
            "keys equal to the exact index",
            "sharded ms (mmap)",
            "one index ms",
        ],
        "rows": rows,
    }


def _jpeg_12mp(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = 3000, 4000
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    img = np.stack(
        [(np.sin(xx / (60 + 9 * c + seed)) + np.cos(yy / (45 + 5 * c))) * 60 + 128 for c in range(3)], -1
    )
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def _embed_watch(out: Path, dim: int, started: float) -> Callable[[int], List[float]]:
    """Samples of a running embedding job: [seconds, RSS MiB, image rows written], printed as
    they come (a run cut short still shows how far it got)."""

    def watch(pid: int) -> List[float]:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
        side = out / "images" / ".00000.npy.rows"
        rows = side.stat().st_size // (4 * dim) if side.is_file() else 0
        sample = [round(time.perf_counter() - started), round(rss), rows]
        print(f"[embed {out.name}] {sample[0]} s: RSS {sample[1]} MiB, {rows} photos written", flush=True)
        return sample

    return watch


def part_embed(tmp: Path) -> Dict[str, Any]:
    import torch

    from training.models import build_teacher, save_checkpoint

    big = int(os.environ.get("LEANCLIP_BENCH_SCALE_EMBED_BIG", "10000"))
    n_distinct = int(os.environ.get("LEANCLIP_BENCH_SCALE_EMBED_DISTINCT", "24"))
    torch.manual_seed(0)
    model = build_teacher(pretrained=None, tiny=True)
    save_checkpoint(tmp / "model.pt", model, {"stage": 2})
    with torch.no_grad():
        dim = int(model.encode_image(torch.zeros(1, 3, model.image_size, model.image_size)).shape[1])
    distinct = [tmp / f"photo{i}.jpg" for i in range(n_distinct)]
    for i, p in enumerate(distinct):
        _jpeg_12mp(p, i)
    rows, trend = [], []
    for size in (100, big):
        folder = tmp / f"photos{size}"
        folder.mkdir()
        for i in range(size):  # hard links: 12-MP files without 12-MP of disk each
            os.link(distinct[i % len(distinct)], folder / f"{i:06d}.jpg")
        out = tmp / f"emb{size}"
        argv = ["--model", str(tmp / "model.pt"), "--folder", str(folder), "--out", str(out), "--shard-size", str(size), "--batch-size", "32", "--device", "cpu"]  # fmt: skip
        watch = _embed_watch(out, dim, time.perf_counter())
        r = run_peak("training.embed", argv, preload="numpy, torch, training.models", watch=watch)
        trend = [f"{n:,} photos: {rss - r['start']:.0f}" for _, rss, n in r["samples"]]
        rows.append(
            [
                f"{size:,}",
                "1",
                f"{r['seconds']:.0f}",
                f"{size / r['seconds']:.1f}",
                f"{r['start']:.0f}",
                f"{r['peak']:.0f}",
                f"{r['peak'] - r['start']:.0f}",
            ]
        )
    a, b = (float(r[-1]) for r in rows)
    mb = np.mean([p.stat().st_size for p in distinct]) / 1e6
    return {
        "title": f"Embedding job on 12-megapixel JPEGs (4000 x 3000, ~{mb:.1f} MB each), one job shard, tiny teacher checkpoint, batch 32",
        "header": [
            "shard size (photos)",
            "shards",
            "seconds",
            "photos/s",
            "RSS after imports MiB",
            "peak RSS MiB",
            "peak beyond imports MiB",
        ],
        "rows": rows,
        "note": f"Peak beyond imports, large shard / small shard: {b / a:.2f} (target: within 10%). "
        f"'After imports' includes torch and the model code; the photos are hard links to {n_distinct} "
        f"distinct generated files; images decoded on the job's default threads ({CORES} here). "
        f"RSS beyond imports while the {big:,}-photo shard ran, MiB (sampled each minute): "
        + ("; ".join(trend) or "no sample")
        + ".",
    }


def part_ivf(tmp: Path) -> Dict[str, Any]:
    import leanclip
    from leanclip.shards import ShardedIndex

    n = int(os.environ.get("LEANCLIP_BENCH_SCALE_IVF_N", "10000000"))
    dim, per_file, nlist, pq, nprobe, nq = 128, 500_000, 4096, 32, 64, 200
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    emb = tmp / "emb"
    emb.mkdir()
    files = []
    for i, lo in enumerate(range(0, n, per_file)):
        files.append(emb / f"{i:05d}.npy")
        np.save(files[-1], _unit(rng, min(per_file, n - lo), dim, centres).astype(np.float16))
    queries = _unit(rng, nq, dim, centres)
    out = tmp / "ivf"
    build = run_peak(
        "leanclip.build_ivf",
        [str(out), str(emb), "--nlist", str(nlist), "--pq", str(pq), "--dtype", "f16", "--quiet"],
    )
    size = sum(p.stat().st_size for p in out.glob("*.ivf"))
    # exact top-10 from the stored (f16) rows, file by file
    best_s = np.full((nq, 10), -np.inf, np.float32)
    best_k = np.zeros((nq, 10), np.int64)
    row = 0
    for f in files:
        x = np.load(f).astype(np.float32)
        s = queries @ x.T
        top = np.argpartition(-s, 10, axis=1)[:, :10]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        cand_k = np.concatenate([best_k, top + row], 1)
        order = np.argsort(-cand_s, axis=1)[:, :10]
        best_s, best_k = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_k, order, 1)
        row += len(x)

    def recall(keys: np.ndarray) -> float:
        return float(np.mean([len(set(keys[i].tolist()) & set(best_k[i].tolist())) / 10 for i in range(nq)]))

    sharded = ShardedIndex.load(out, mmap=True)
    sharded.nprobe = nprobe
    t0 = time.perf_counter()
    batch_sharded = recall(sharded.search(queries, 10)[0].astype(np.int64))
    t_batch_sharded = time.perf_counter() - t0
    single_sharded = recall(np.stack([sharded.search(q, 10)[0] for q in queries]).astype(np.int64))
    del sharded
    whole = leanclip.IVFIndex.load(out / "quantizer.ivf")  # the same trained quantizer, in memory
    row = 0
    for f in files:
        x = np.load(f, mmap_mode="r")
        for lo in range(0, len(x), 65536):
            chunk = np.asarray(x[lo : lo + 65536], np.float32)
            whole.add(np.arange(row + lo, row + lo + len(chunk), dtype=np.uint64), chunk)
        row += len(x)
    whole.nprobe = nprobe
    t0 = time.perf_counter()
    batch_whole = recall(whole.search(queries, 10)[0].astype(np.int64))
    t_batch_whole = time.perf_counter() - t0
    single_whole = recall(np.stack([whole.search(q, 10)[0] for q in queries]).astype(np.int64))
    rows = [
        [
            "IVF shard files through mmap (ShardedIndex)",
            f"{batch_sharded:.4f}",
            f"{single_sharded:.4f}",
            f"{t_batch_sharded:.2f}",
        ],
        [
            "one IVFIndex in memory, same quantizer and settings",
            f"{batch_whole:.4f}",
            f"{single_whole:.4f}",
            f"{t_batch_whole:.2f}",
        ],
    ]
    return {
        "title": f"IVF from {len(files)} embedding files: {n:,} x {dim} f16, nlist {nlist}, pq {pq} (4-bit codes), nprobe {nprobe}",
        "header": ["served as", f"recall@10, batch of {nq}", "recall@10, one query at a time", "batch s"],
        "rows": rows,
        "note": f"Build (`python -m leanclip.build_ivf`, {build['seconds']:.0f} s): peak RSS {build['peak']:.0f} MiB "
        f"({build['start']:.0f} MiB after imports) for {size / 2**20:,.0f} MiB of IVF files: peak / file size = "
        f"{build['peak'] / (size / 2**20):.3f} (target <= 0.25). Recall against the exact top-10 of the stored f16 rows.",
    }


def part_serve(tmp: Path) -> Dict[str, Any]:
    """Memory of IVF shard files served through mmap: RSS grows with the lists a search touches."""
    n = int(os.environ.get("LEANCLIP_BENCH_SCALE_SERVE_N", "2000000"))
    dim, per_file, nlist, pq = 128, 500_000, 1024, 32
    rng = np.random.default_rng(12)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    emb = tmp / "emb"
    emb.mkdir()
    for i, lo in enumerate(range(0, n, per_file)):
        np.save(emb / f"{i:05d}.npy", _unit(rng, min(per_file, n - lo), dim, centres).astype(np.float16))
    np.save(tmp / "q.npy", _unit(rng, 64, dim, centres))
    out = tmp / "ivf"
    run_peak("leanclip.build_ivf", [str(out), str(emb), "--nlist", str(nlist), "--pq", str(pq), "--quiet"])
    size = sum(p.stat().st_size for p in out.glob("*.ivf")) / 2**20
    code = (
        "import json, numpy as np\n"
        "from leanclip.shards import ShardedIndex\n"
        "def rss(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024\n"
        f"q = np.load({str(tmp / 'q.npy')!r}); base = rss()\n"
        f"s = ShardedIndex.load({str(out)!r}, mmap=True, verify=False); opened = rss()\n"
        "out = {'opened': opened - base}\n"
        "for nprobe in (1, 8, 64):\n"
        "    s.nprobe = nprobe\n"
        "    for x in q[:16]: s.search(x, 10)\n"
        "    out[f'single_{nprobe}'] = rss() - base\n"
        "s.search(q, 10); out['batch_64'] = rss() - base\n"
        "print('@@' + json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(CORES), capture_output=True, text=True
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("@@")]
    if done.returncode or not lines:
        raise RuntimeError(done.stderr[-3000:])
    r = json.loads(lines[-1][2:])
    rows = [
        ["opened (verify=False)", f"{r['opened']:.0f}"],
        ["+ 16 single queries, nprobe 1", f"{r['single_1']:.0f}"],
        ["+ 16 single queries, nprobe 8", f"{r['single_8']:.0f}"],
        ["+ 16 single queries, nprobe 64", f"{r['single_64']:.0f}"],
        ["+ a batch of 64 queries, nprobe 64", f"{r['batch_64']:.0f}"],
    ]
    return {
        "title": f"IVF shard files served through mmap: {n:,} x {dim} f16, nlist {nlist}, pq {pq}, {size:,.0f} MiB of files",
        "header": ["after", "RSS beyond the process's start, MiB (cumulative)"],
        "rows": rows,
        "note": "Each step adds the pages of the lists it probes (and, for the batch, its working copies).",
    }


PARTS = {
    "equality": part_equality,
    "mining": part_mining,
    "search": part_search,
    "embed": part_embed,
    "ivf": part_ivf,
    "serve": part_serve,
}


def render(parts: Dict[str, Any]) -> str:
    text = H.header(
        "From one machine to a cluster: sharded mining, embedding, IVF building and search",
        ["torch"],
        note="Each part below carries its own date and load (parts are rerun alone: "
        "`LEANCLIP_BENCH_SCALE_PARTS=mining python -m benchmarks scale`). W processes are gloo ranks on this "
        "one machine, started by torchrun; no number here is measured on a cluster.",
    )
    for name in PARTS:
        if name not in parts:
            continue
        p = parts[name]
        text += (
            f"\n## {p['title']}\n\n- measured {p['date']}, load at the start {p['load']}, CPU {p['cpu']}\n\n"
        )
        text += markdown_table(p["header"], p["rows"]) + "\n"
        if p.get("note"):
            text += "\n" + p["note"] + "\n"
    return text


def _now_and_load() -> str:
    import datetime as dt

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, load at the start {load}"


def main(argv: Sequence[str] = ()) -> None:
    import datetime as dt

    wanted = [p for p in os.environ.get("LEANCLIP_BENCH_SCALE_PARTS", ",".join(PARTS)).split(",") if p]
    for name in wanted:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        with tempfile.TemporaryDirectory(
            prefix=f"bench_scale_{name}_", dir=os.environ.get("LEANCLIP_BENCH_TMP")
        ) as tmp:
            result = PARTS[name](Path(tmp))
        result.update(
            date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load=load, cpu=cpu_model()
        )
        stored = (
            json.loads(PARTS_FILE.read_text()) if PARTS_FILE.is_file() else {}
        )  # read late: parts may run side by side
        stored[name] = result
        PARTS_FILE.write_text(json.dumps(stored, indent=1))
        print(f"[{name} done]", flush=True)
    H.write_result("scale", render(json.loads(PARTS_FILE.read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
