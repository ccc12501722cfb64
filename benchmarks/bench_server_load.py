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
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (counts as an error)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write results/server_load.md")
    args = ap.parse_args(
        argv if argv is not None else (sys.argv[2:] if sys.argv[:2] == ["-m", "benchmarks"] else sys.argv[1:])
    )
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
