"""Voyager-style loader fuzzing from Python: thousands of random and mutated index files.

Each must make ``leanclip.Index.load`` (read and mmap) raise ``leanclip.IndexFileError``, never
load silently and never crash. The files are fed by a subprocess (this file run as a script), so
a crash (a signal, an abort) fails the test with the case that caused it instead of killing
pytest. The cargo-fuzz targets in rust/engine/fuzz/ go much further (millions of inputs);
this is the check that runs with every test run, through the Python binding.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "v1"
HEADER = 64


# --- building files ---------------------------------------------------------------------------


def _xxh3():
    # The system libxxhash (a dependency of apt itself on Debian) computes the format's XXH3-64.
    lib = ctypes.CDLL("libxxhash.so.0")
    f = lib.XXH3_64bits
    f.restype = ctypes.c_uint64
    f.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return lambda b: f(bytes(b), len(b))


def layout(data: bytes | bytearray) -> tuple[int, int, int, int]:
    """(count, meta_end, vectors_start, vectors_end) as the header declares them."""
    dim = struct.unpack_from("<I", data, 16)[0]
    dtype = data[20]
    count = struct.unpack_from("<Q", data, 24)[0]
    meta_end = HEADER + count * (12 if dtype == 2 else 8)
    vs = (meta_end + 63) // 64 * 64
    size = {0: 4, 1: 2}.get(dtype, 1)
    return count, meta_end, vs, vs + count * dim * size


def rechecksum(data: bytearray, xxh3) -> bytearray:
    """Recomputes both checksums for whatever the header declares (clamped to the file)."""
    _, _, vs, ve = layout(data)
    vs, ve = min(vs, len(data)), min(ve, len(data))
    struct.pack_into("<Q", data, 48, xxh3(data[vs:ve]))
    struct.pack_into("<Q", data, 56, xxh3(bytes(data[:56]) + bytes(data[HEADER : max(vs, HEADER)])))
    return data


def base_files(tmp: Path) -> dict[str, bytes]:
    import leanclip

    files = {p.name: p.read_bytes() for p in sorted(GOLDEN.glob("*.lcx"))}
    rng = np.random.default_rng(0)
    for dtype in ("f32", "f16", "i8"):  # larger files: vectors past libFuzzer-sized inputs
        index = leanclip.Index(33, metric="ip", dtype=dtype)
        index.add(np.arange(100, dtype=np.uint64) * 3, rng.standard_normal((100, 33)).astype(np.float32))
        p = tmp / f"big_{dtype}.lcx"
        index.save(str(p))
        files[p.name] = p.read_bytes()
    return files


def cases(tmp: Path):
    """Yields (family, name, bytes, must_fail)."""
    xxh3 = _xxh3()
    rng = random.Random(20261125)
    bases = base_files(tmp)
    for name, data in bases.items():
        lengths = range(len(data)) if len(data) <= 600 else sorted(rng.sample(range(len(data)), 150))
        for n in lengths:
            yield "truncated", f"{name}[:{n}]", data[:n], True
        for extra in (b"\0", b"\0" * 7, b"\0" * 64, bytes(rng.randrange(256) for _ in range(100))):
            yield "appended", f"{name}+{len(extra)}", data + extra, True
        positions = range(len(data)) if len(data) <= 600 else rng.sample(range(len(data)), 150)
        for pos in positions:
            b = bytearray(data)
            b[pos] ^= rng.randrange(1, 256)
            yield "byte-flip", f"{name}@{pos}", bytes(b), True
        for i in range(40):
            b = bytearray(data)
            for pos in rng.sample(range(len(b)), rng.randrange(2, 9)):
                b[pos] ^= rng.randrange(1, 256)
            yield "multi-flip", f"{name}#{i}", bytes(b), True
    for i in range(400):
        yield "random", f"random#{i}", bytes(rng.randrange(256) for _ in range(rng.randrange(0, 2000))), True
    for i in range(400):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 1200)))
        yield "random-header", f"magic+v1#{i}", b"LEANCLIP" + struct.pack("<I", 1) + body, True
    for i in range(300):
        # A self-consistent header (sizes match the file) with random keys/vectors and checksums.
        dim, dtype, count = rng.randrange(1, 40), rng.randrange(3), rng.randrange(0, 20)
        b = bytearray(HEADER)
        b[:8] = b"LEANCLIP"
        struct.pack_into("<IIIBBHQ", b, 8, 1, 0, dim, dtype, rng.randrange(3), 0, count)
        _, _, _, ve = layout(b)
        b += bytes(rng.randrange(256) for _ in range(ve - HEADER))
        b[48:64] = bytes(rng.randrange(256) for _ in range(16))
        yield "consistent-header", f"consistent#{i}", bytes(b), True
    for name in ("PNG", "JSON", "SQLite", "zeros", "ff", "other-magic"):
        blob = {
            "PNG": b"\x89PNG\r\n\x1a\n" + bytes(200),
            "JSON": b'{"format_version": 1, "dim": 512}' * 4,
            "SQLite": b"SQLite format 3\0" + bytes(4080),
            "zeros": bytes(4096),
            "ff": b"\xff" * 4096,
            "other-magic": b"LEANCLIQ" + bases["f32_cos.lcx"][8:],
        }[name]
        yield "foreign", name, blob, True

    # Structural lies with valid checksums: the checks behind the checksums must catch them.
    def crafted(base: str, edit, label: str):
        b = bytearray(bases[base])
        edit(b)
        return "crafted", f"{base}:{label}", bytes(rechecksum(b, xxh3)), True

    for base in ("f32_cos.lcx", "f16_ip.lcx", "i8_l2.lcx", "big_i8.lcx", "empty_f32_cos.lcx"):
        for code in (3, 4, 127, 255):
            yield crafted(base, lambda b, c=code: b.__setitem__(20, c), f"dtype={code}")
            yield crafted(base, lambda b, c=code: b.__setitem__(21, c), f"metric={code}")
        for delta in (-1, 1, 2**32, 2**63):

            def set_count(b, d=delta):
                c = struct.unpack_from("<Q", b, 24)[0]
                struct.pack_into("<Q", b, 24, (c + d) % 2**64)

            yield crafted(base, set_count, f"count{delta:+d}")
        for dim in (0, 65537, 2**31, 2**32 - 1):
            yield crafted(base, lambda b, d=dim: struct.pack_into("<I", b, 16, d), f"dim={dim}")
        for pos in (12, 15, 22, 23, 32, 40, 47):
            yield crafted(base, lambda b, p=pos: b.__setitem__(p, 1), f"reserved[{pos}]")
        for version in (0, 2, 2**32 - 1):
            yield crafted(base, lambda b, v=version: struct.pack_into("<I", b, 8, v), f"version={version}")
        count, meta_end, vs, _ = layout(bases[base])
        if vs > meta_end:
            yield crafted(base, lambda b, p=meta_end: b.__setitem__(p, 1), "padding")
        if count >= 2:
            yield crafted(base, lambda b: b.__setitem__(slice(72, 80), b[64:72]), "duplicate-key")
        if bases[base][20] == 2 and count >= 1:
            key_end = HEADER + 8 * count
            for bad in (float("nan"), float("inf"), float("-inf")):
                yield crafted(
                    base, lambda b, x=bad, p=key_end: struct.pack_into("<f", b, p, x), f"scale={bad}"
                )

    # Value edits with valid checksums: a different but well-formed index. Loading it is
    # allowed (the file is consistent); refusing it must still be an IndexFileError.
    for name in ("f32_cos.lcx", "f16_l2.lcx", "i8_ip.lcx", "big_f32.lcx", "big_f16.lcx"):
        count, _, vs, ve = layout(bases[name])
        for i in range(60):
            b = bytearray(bases[name])
            pos = rng.randrange(HEADER, HEADER + 8 * count) if i % 2 else rng.randrange(vs, ve)
            b[pos] ^= rng.randrange(1, 256)
            yield "value-edit", f"{name}@{pos}", bytes(rechecksum(b, xxh3)), False


# --- the subprocess ------------------------------------------------------------------------------


def worker(workdir: Path) -> None:
    import leanclip

    progress = open(workdir / "progress.txt", "w")
    counts: dict[str, int] = {}
    loaded: dict[str, int] = {}
    violations: list[str] = []
    path = workdir / "case.lcx"
    q = None
    for family, name, data, must_fail in cases(workdir):
        progress.write(f"{family} {name}\n")
        progress.flush()
        path.write_bytes(data)
        counts[family] = counts.get(family, 0) + 1
        for mmap in (False, True):
            try:
                index = leanclip.Index.load(str(path), mmap=mmap)
            except leanclip.IndexFileError as e:
                if str(path) not in str(e):
                    violations.append(f"{family} {name} mmap={mmap}: message does not name the file: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - anything else is a finding
                violations.append(f"{family} {name} mmap={mmap}: {type(e).__name__}: {e}")
                continue
            if must_fail:
                violations.append(
                    f"{family} {name} mmap={mmap}: loaded ({len(index)} vectors) instead of raising"
                )
                continue
            loaded[family] = loaded.get(family, 0) + 1
            q = np.ones((9, index.dim), dtype=np.float32)
            keys, scores = index.search(q, k=4)
            if keys.shape != (9, min(4, len(index))):
                violations.append(f"{family} {name}: search returned shape {keys.shape}")
            del index
    print(json.dumps({"counts": counts, "loaded": loaded, "violations": violations}))


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzzfiles")
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    proc = subprocess.run(
        [sys.executable, __file__, str(workdir)], capture_output=True, text=True, timeout=600, env=env
    )
    last = (
        (workdir / "progress.txt").read_text().splitlines()[-1:]
        if (workdir / "progress.txt").exists()
        else []
    )
    assert proc.returncode == 0, (
        f"loader subprocess died with {proc.returncode} on case {last}\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_thousands_of_bad_files_raise_index_file_error(fuzz_run):
    counts = fuzz_run["counts"]
    must_fail = sum(n for f, n in counts.items() if f != "value-edit")
    assert must_fail >= 3000, counts
    for family in (
        "truncated",
        "appended",
        "byte-flip",
        "multi-flip",
        "random",
        "random-header",
        "consistent-header",
        "foreign",
        "crafted",
    ):
        assert counts.get(family, 0) > 0, family
    assert fuzz_run["violations"] == []


def test_consistent_value_edits_load_or_raise_cleanly(fuzz_run):
    # These files are well-formed (checksums recomputed); most must load and be searchable.
    assert fuzz_run["counts"]["value-edit"] == 300
    assert fuzz_run["loaded"].get("value-edit", 0) >= 2 * 250


def test_missing_file_and_directory_are_os_errors(tmp_path):
    import leanclip

    for mmap in (False, True):
        with pytest.raises(FileNotFoundError):
            leanclip.Index.load(str(tmp_path / "absent.lcx"), mmap=mmap)
        with pytest.raises(OSError):
            leanclip.Index.load(str(tmp_path), mmap=mmap)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
