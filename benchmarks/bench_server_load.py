"""Load test of ``leanclip serve`` on loopback: 64 concurrent clients, 30 s of text queries
against a gallery of 100,000 synthetic vectors.

    python -m benchmarks server_load                 # writes results/server_load.md
    python -m benchmarks.bench_server_load --seconds 5 --clients 8 --vectors 10000   # quick

The gallery is built directly in the store format of ``leanclip.gallery`` (SQLite rows and an
``index-1.lci``): 100,000 random unit vectors of the model's dimension under made-up file names,
so only the search path is measured (text encoding by the real model, exact search, SQLite
lookups, JSON). The server is the real CLI (``leanclip serve --model BUNDLE``) in its own process;
the load generator is one asyncio process with one keep-alive HTTP/1.1 connection per client,
each sending ``GET /api/search?q=...&k=10`` back to back with a fresh query text (no caching
effects). Reported: requests/s, latency p50/p90/p99/max, errors (any non-200, timeout or broken
connection; must be 0), and the server's RSS before the load (after a warm-up) and after it.

Model: ``--model PATH``; default the cached starter bundle (``leanclip models``), else a tiny
test bundle exported on the fly (needs torch + open_clip).

Memory (``--memory``): the server's RSS under concurrent large-file requests, in a section of
the same results file. A gallery holds one valid JPEG with a long trailer (``--big-mb``, 300 MB)
and ``--pngs`` copies of a 7999 x 7999 one-colour PNG (200 KB on disk, 64 Mpx decoded); it is
indexed with the real model, then ``--file-clients`` concurrent ``GET /file/big.jpg`` (each body
read whole and counted) and ``--thumb-clients`` concurrent ``GET /thumb/KEY`` (one PNG each)
are sent while the server's RSS is sampled every 10 ms. ``--code DIR`` runs the server from
another checkout's ``python/`` folder (the code before a change: ``git worktree add DIR REV``),
so before and after are measured on the same machine, same gallery::

    python -m benchmarks.bench_server_load --memory --code /tmp/before --thumb-clients 8 --label before
    python -m benchmarks.bench_server_load --memory --label after
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ADJ = [
    "red",
    "small",
    "old",
    "happy",
    "dark",
    "bright",
    "wet",
    "snowy",
    "busy",
    "quiet",
    "golden",
    "blue",
    "tiny",
    "huge",
    "sleepy",
    "wooden",
    "rusty",
    "foggy",
    "sunny",
    "crowded",
]
NOUN = [
    "dog",
    "cat",
    "car",
    "beach",
    "mountain",
    "child",
    "bicycle",
    "boat",
    "tree",
    "house",
    "bridge",
    "flower",
    "train",
    "horse",
    "street",
    "cake",
    "guitar",
    "lake",
    "city",
    "forest",
]
PLACE = [
    "at night",
    "in the rain",
    "on a hill",
    "near the sea",
    "in a park",
    "at sunset",
    "indoors",
    "in winter",
    "on a table",
    "in the snow",
    "by the river",
    "in a garden",
    "on the road",
    "at the market",
    "in the kitchen",
    "under a tree",
    "at a party",
    "in the desert",
    "at dawn",
    "in fog",
]


def pick_model(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from leanclip import registry

    try:
        return registry.resolve(None, build=False)
    except Exception:
        from tests._fixtures_bundle import make_tiny_bundle

        return make_tiny_bundle(Path(tempfile.mkdtemp(prefix="leanclip-load-")) / "bundle")


def build_gallery(root: Path, model: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A gallery folder and store holding n synthetic vectors, in leanclip.gallery's format."""
    from leanclip import Index
    from leanclip.bundle import read_manifest
    from leanclip.gallery.store import SCHEMA as _SCHEMA
    from leanclip.gallery.store import SCHEMA_VERSION

    manifest = read_manifest(model, verify=False)
    dim = manifest.embedding_dim
    photos, store = root / "photos", root / "store"
    photos.mkdir(parents=True)
    store.mkdir()
    rng = np.random.default_rng(seed)
    index = Index(dim, metric="cos", dtype="f32")
    keys = np.arange(1, n + 1, dtype=np.uint64)
    for i in range(0, n, 20_000):
        v = rng.standard_normal((min(20_000, n - i), dim)).astype(np.float32)
        index.add(keys[i : i + len(v)], v)
    index.save(str(store / "index-1.lci"))
    conn = sqlite3.connect(store / "gallery.db")
    conn.execute("PRAGMA journal_mode=WAL")
    for stmt in _SCHEMA.strip().split(";"):
        if stmt.strip():
            conn.execute(stmt)
    meta = {
        "schema_version": str(SCHEMA_VERSION),
        "generation": "1",
        "next_key": str(n + 1),
        "model_id": manifest.model_id,
        "dim": str(dim),
        "dtype": "f32",
        "model_source": str(model.absolute()),
    }
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
    conn.executemany(
        "INSERT INTO files (path, size, mtime_ns, sha256, key, status, reason) VALUES (?, ?, ?, ?, ?, 'ok', NULL)",
        (
            (
                f"album{k % 100:02d}/img_{k:06d}.jpg".encode(),
                1000 + k,
                1_700_000_000_000_000_000 + k,
                hashlib.sha256(str(k).encode()).hexdigest(),
                k,
            )
            for k in range(1, n + 1)
        ),
    )
    conn.commit()
    conn.close()
    return photos, store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


async def client(
    port: int, deadline: float, rng: random.Random, lat: list, errors: list, timeout: float
) -> None:
    reader = writer = None
    host = f"127.0.0.1:{port}"
    while time.monotonic() < deadline:
        q = f"{rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(PLACE)}"
        target = "/api/search?" + urllib.parse.urlencode({"q": q, "k": 10})
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n".encode()
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {
                ln.split(":", 1)[0].lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln
            }
            body = await asyncio.wait_for(
                reader.readexactly(int(headers.get("content-length", "0"))), timeout
            )
            elapsed = time.perf_counter() - t0
            if status != 200:
                errors.append(f"HTTP {status}: {body[:200]!r}")
            else:
                results = json.loads(body)["results"]
                if len(results) != 10:
                    errors.append(f"{len(results)} results instead of 10")
                else:
                    lat.append(elapsed)
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        except Exception as exc:  # noqa: BLE001 - every failure is counted
            errors.append(f"{type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def load(
    port: int, clients: int, seconds: float, seed: int, timeout: float
) -> tuple[list, list, float]:
    lat: list = []
    errors: list = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    await asyncio.gather(
        *(client(port, deadline, random.Random(seed + i), lat, errors, timeout) for i in range(clients))
    )
    return lat, errors, time.monotonic() - t0


def pct(xs: list, p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def run(args: argparse.Namespace) -> dict:
    model = pick_model(args.model).absolute()
    tmp = Path(tempfile.mkdtemp(prefix="leanclip-load-"))
    t = time.perf_counter()
    photos, store = build_gallery(tmp, model, args.vectors)
    build_s = time.perf_counter() - t
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "python"), env_pp()])))
    cmd = [
        sys.executable,
        "-c",
        "import sys; from leanclip.cli import main; sys.exit(main())",
        "serve",
        str(photos),
        "--store",
        str(store),
        "--model",
        str(model),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        import urllib.request

        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(base + "/api/info", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"server exited: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.1)
        else:
            raise RuntimeError("server did not come up")
        assert info["ok"] == args.vectors, info
        rss_idle = rss_mb(server.pid)
        # warm-up: model and index loaded, caches filled, thread stacks made
        lat_w, err_w, _ = asyncio.run(
            load(port, args.clients, args.warmup, seed=10_000, timeout=args.timeout)
        )
        rss_before = rss_mb(server.pid)
        la = os.getloadavg()
        lat, errors, wall = asyncio.run(load(port, args.clients, args.seconds, seed=1, timeout=args.timeout))
        rss_after = rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": f"{model.name} ({info.get('model_id', '')}, dim {read_dim(model)})",
        "vectors": args.vectors,
        "clients": args.clients,
        "seconds": args.seconds,
        "wall_s": wall,
        "build_s": build_s,
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "warmup_requests": len(lat_w),
        "warmup_errors": len(err_w),
        "rps": len(lat) / wall,
        "p50_ms": pct(lat, 50) * 1e3,
        "p90_ms": pct(lat, 90) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "max_ms": max(lat) * 1e3 if lat else float("nan"),
        "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"),
        "rss_idle_mb": rss_idle,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_growth_pct": 100 * (rss_after - rss_before) / rss_before,
        "server_alive": alive,
        "loadavg_before": la,
    }


def build_memory_gallery(root: Path, model: Path, big_mb: int, pngs: int, env: dict) -> tuple[Path, list]:
    """A folder with big.jpg (a valid JPEG followed by ``big_mb`` MB of trailer) and ``pngs``
    copies of one 7999 x 7999 PNG, indexed by ``leanclip index`` of the code under test (its
    store format); returns the folder and the PNGs' photo keys."""
    import shutil

    from PIL import Image

    photos = root / "photos"
    photos.mkdir(parents=True)
    Image.new("RGB", (640, 480), (200, 120, 40)).save(photos / "big.jpg", quality=90)
    with open(photos / "big.jpg", "ab") as fh:
        block = b"\0" * (1 << 20)
        for _ in range(big_mb):
            fh.write(block)
    Image.new("RGB", (7999, 7999), (30, 90, 200)).save(photos / "png_000.png")
    index = [*CLI, "index", str(photos), "--model", str(model), "-q"]
    subprocess.run(index, env=env, check=True, stdout=subprocess.DEVNULL)
    for i in range(1, pngs):  # copies: indexed by reusing the first one's vector
        shutil.copyfile(photos / "png_000.png", photos / f"png_{i:03d}.png")
    subprocess.run(index, env=env, check=True, stdout=subprocess.DEVNULL)
    conn = sqlite3.connect(photos / ".leanclip" / "gallery.db")
    rows = conn.execute("SELECT path, key FROM files WHERE status='ok' ORDER BY path").fetchall()
    keys = [k for p, k in rows if bytes(p).startswith(b"png_")]
    conn.close()
    assert len(keys) == pngs, keys
    return photos, keys


CLI = [sys.executable, "-c", "import sys; from leanclip.cli import main; sys.exit(main())"]


async def fetch_all(port: int, target: str, timeout: float) -> tuple[int, int]:
    """(status, body bytes) of one GET, the body read in chunks and dropped."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split()[1])
        n = 0
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 20), timeout)
            if not chunk:
                return status, n
            n += len(chunk)
    finally:
        writer.close()


async def burst(port: int, targets: list[str], pid: int, timeout: float) -> dict:
    """All ``targets`` at once; the server's peak RSS (sampled every 10 ms) and the outcomes."""
    peak = rss_mb(pid)
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    results = await asyncio.gather(*(fetch_all(port, t, timeout) for t in targets), return_exceptions=True)
    wall = time.perf_counter() - t0
    done = True
    await sampler
    ok = [r for r in results if isinstance(r, tuple) and r[0] == 200]
    errors = [repr(r) if not isinstance(r, tuple) else f"HTTP {r[0]}" for r in results if r not in ok]
    await asyncio.sleep(0.5)  # what the server keeps once the burst is over
    after = rss_mb(pid)
    return {
        "peak_mb": peak,
        "after_mb": after,
        "wall_s": wall,
        "ok": len(ok),
        "bytes": [r[1] for r in ok],
        "errors": errors,
    }


def run_memory(args: argparse.Namespace) -> dict:
    import shutil
    import urllib.request

    model = pick_model(args.model).absolute()
    tmp = Path(tempfile.mkdtemp(prefix="leanclip-mem-"))
    code = Path(args.code).absolute() / "python" if args.code else ROOT / "python"
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(code), env_pp()])))
        photos, keys = build_memory_gallery(tmp, model, args.big_mb, args.pngs, env)
        port = free_port()
        cmd = [*CLI, "serve", str(photos), "--model", str(model), "--port", str(port)]

        def cap_memory() -> None:  # a safety net on a shared machine: the server, not the host, fails
            import resource

            limit = args.server_limit_gb << 30
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        server = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, preexec_fn=cap_memory
        )
        try:
            for _ in range(600):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError(
                            f"server exited: {server.stderr.read().decode()[-2000:]}"
                        ) from None
                    time.sleep(0.1)
            asyncio.run(fetch_all(port, "/api/search?q=a+photo&k=5", args.timeout))  # model loaded
            idle = rss_mb(server.pid)
            files = asyncio.run(burst(port, ["/file/big.jpg"] * args.file_clients, server.pid, args.timeout))
            size = (photos / "big.jpg").stat().st_size
            files["complete"] = sum(1 for n in files["bytes"] if n == size)
            after_files = files["after_mb"]
            thumbs = asyncio.run(
                burst(port, [f"/thumb/{k}" for k in keys[: args.thumb_clients]], server.pid, args.timeout)
            )
            alive = server.poll() is None
            hwm = next(
                int(line.split()[1]) / 1024.0
                for line in Path(f"/proc/{server.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "label": args.label or ("this checkout" if not args.code else str(args.code)),
        "code": str(code),
        "model": model.name,
        "big_mb": size / 1e6,
        "idle_mb": idle,
        "after_files_mb": after_files,
        "files": files,
        "thumbs": thumbs,
        "hwm_mb": hwm,
        "alive": alive,
    }


def report_memory(r: dict) -> str:
    from benchmarks._harness import header

    try:
        from benchmarks._harness import markdown_table
    except ImportError:  # its new home, while benchmarks/_harness.py is being changed
        from training.report import markdown_table

    f, t = r["files"], r["thumbs"]
    rows = [
        [
            f"{len(f['bytes']) + len(f['errors'])} x GET /file/big.jpg ({r['big_mb']:.0f} MB)",
            f"{f['complete']} complete",
            f["wall_s"],
            r["idle_mb"],
            f["peak_mb"],
            f["peak_mb"] - r["idle_mb"],
            f["after_mb"],
        ],
        [
            f"{t['ok'] + len(t['errors'])} x GET /thumb/KEY (7999x7999 PNG each)",
            f"{t['ok']} ok",
            t["wall_s"],
            r["after_files_mb"],
            t["peak_mb"],
            t["peak_mb"] - r["after_files_mb"],
            t["after_mb"],
        ],
    ]
    note = (
        f"Server code: {r['label']} (`{r['code']}`); model {r['model']}. Requests of each row sent at once "
        "on separate connections by one asyncio client on the same machine; RSS of the server process "
        "sampled every 10 ms (VmRSS). Server peak RSS over the whole run (VmHWM): "
        f"{r['hwm_mb']:.0f} MB; alive afterwards: {r['alive']}."
    )
    if f["errors"] or t["errors"]:
        note += " Errors: " + "; ".join((f["errors"] + t["errors"])[:5])
    table = markdown_table(
        ["requests", "outcome", "wall s", "RSS before MB", "peak RSS MB", "peak - before MB", "RSS after MB"],
        rows,
    )
    text = header(f"Memory under large files and thumbnails: {r['label']}", ["pillow"], note)
    return "#" + text + "\n" + table + "\n"


def write_memory_section(text: str) -> None:
    """Add (or replace) this label's memory section in results/server_load.md, keeping the rest."""
    from benchmarks._harness import RESULTS, write_result

    title = text.splitlines()[0]
    current = (
        (RESULTS / "server_load.md").read_text(encoding="utf-8")
        if (RESULTS / "server_load.md").exists()
        else ""
    )
    sections = current.split("\n## ")
    kept = [sections[0].rstrip("\n")] + [
        "## " + sec.rstrip("\n") for sec in sections[1:] if "## " + sec.splitlines()[0] != title
    ]
    write_result("server_load", "\n\n".join([*kept, text.rstrip("\n")]) + "\n")


def env_pp() -> str:
    return os.environ.get("PYTHONPATH", "")


def read_dim(model: Path) -> int:
    from leanclip.bundle import read_manifest

    return read_manifest(model, verify=False).embedding_dim


def report(r: dict) -> str:
    from benchmarks._harness import header, markdown_table

    note = (
        f"Gallery: {r['vectors']:,} synthetic unit vectors (f32, cos) in the gallery store format, built "
        f"in {r['build_s']:.1f} s. Server: `leanclip serve` (ThreadingHTTPServer) with model {r['model']}. "
        f"Load: {r['clients']} concurrent keep-alive clients (one asyncio process on the same machine, so "
        f"client and server share the 2 cores) sending `GET /api/search?q=<random 3-part text>&k=10` "
        f"for {r['seconds']:.0f} s after a warm-up of {r['warmup_requests']} requests "
        f"({r['warmup_errors']} errors). Load average before the run: "
        f"{', '.join(f'{x:.1f}' for x in r['loadavg_before'])} (a shared machine)."
    )
    table = markdown_table(
        [
            "requests",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "errors",
            "RSS before MB",
            "RSS after MB",
            "RSS growth",
        ],
        [
            [
                r["requests"],
                r["rps"],
                r["p50_ms"],
                r["p90_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["errors"],
                r["rss_before_mb"],
                r["rss_after_mb"],
                f"{r['rss_growth_pct']:+.1f}%",
            ]
        ],
    )
    verdict = (
        f"Errors: {r['errors']} (target 0); RSS growth {r['rss_growth_pct']:+.1f}% (target at most +10%); "
        f"server alive afterwards: {r['server_alive']}. RSS when idle, before the warm-up: "
        f"{r['rss_idle_mb']:.0f} MB."
    )
    if r["error_samples"]:
        verdict += "\n\nFirst errors: " + "; ".join(r["error_samples"])
    return (
        header("leanclip serve under load", ["onnxruntime", "tokenizers"], note)
        + "\n"
        + table
        + "\n\n"
        + verdict
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("LEANCLIP_BENCH_MODEL"))
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="per-request timeout, s (counts as an error; default 60, --memory 300)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; do not write results/server_load.md")
    ap.add_argument(
        "--memory", action="store_true", help="measure RSS under large /file/ and /thumb/ requests"
    )
    ap.add_argument(
        "--code", default=None, help="--memory: run the server from DIR/python (another checkout)"
    )
    ap.add_argument("--label", default="", help="--memory: the name of this run in the results")
    ap.add_argument("--big-mb", type=int, default=300, help="--memory: trailer of the large JPEG, MB")
    ap.add_argument("--pngs", type=int, default=40, help="--memory: 7999x7999 PNGs in the gallery")
    ap.add_argument("--file-clients", type=int, default=8)
    ap.add_argument("--thumb-clients", type=int, default=40)
    ap.add_argument(
        "--server-limit-gb", type=int, default=12, help="--memory: address-space cap of the server"
    )
    args = ap.parse_args(
        argv if argv is not None else (sys.argv[2:] if sys.argv[:2] == ["-m", "benchmarks"] else sys.argv[1:])
    )
    if args.timeout is None:
        args.timeout = 300.0 if args.memory else 60.0
    if args.memory:
        m = run_memory(args)
        text = report_memory(m)
        if args.no_write:
            print(text)
        else:
            write_memory_section(text)
        ok = m["alive"] and not m["files"]["errors"] and not m["thumbs"]["errors"]
        return 0 if ok else 1
    r = run(args)
    text = report(r)
    if args.no_write:
        print(text)
    else:
        from benchmarks._harness import write_result

        write_result("server_load", text)
    print(json.dumps({k: v for k, v in r.items() if k != "error_samples"}, default=str))
    return 0 if r["errors"] == 0 and r["server_alive"] and r["rss_growth_pct"] <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
