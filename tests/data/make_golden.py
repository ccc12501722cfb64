"""Writes the golden index files of the current format version into tests/data/golden/.

    python tests/data/make_golden.py [ROOT]     # writes ROOT/v<N>/ (default tests/data/golden)

Run it once per released format version and commit the output; never regenerate an older
version's directory (those files are the promise that old files keep loading, or are refused
with IndexFileError naming both versions). tests/test_golden.py checks them against
expected.json, and rust/engine/fuzz/corpus/index/ seeds the fuzz targets with the same files.

Vectors come from an integer formula (no random generator), so re-running this script for the
current version gives the same headers and keys and the same vectors up to float rounding
(tests/test_golden.py checks that). ``sha256`` in expected.json is that of the committed file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import leanclip

HERE = Path(__file__).resolve().parent / "golden"
DIM = 7  # not a multiple of any SIMD width
KEYS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 2**32 + 1, 2**63 + 7]
K = 5


def vectors(n: int, dim: int, salt: int) -> np.ndarray:
    i = np.arange(n, dtype=np.int64)[:, None]
    j = np.arange(dim, dtype=np.int64)[None, :]
    v = ((i * 7919 + j * 104729 + salt * 1299709) % 2003).astype(np.float64) / 1001.0 - 1.0
    v[:, 0] += 0.5  # no zero vectors
    return v.astype(np.float32)


def format_version() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.lcx"
        leanclip.Index(1).save(str(p))
        return int.from_bytes(p.read_bytes()[8:12], "little")


def main(root: Path = HERE) -> Path:
    version = format_version()
    out = root / f"v{version}"
    out.mkdir(parents=True, exist_ok=True)
    queries = vectors(3, DIM, salt=99)
    expected: dict = {"format_version": version, "dim": DIM, "k": K, "queries": queries.tolist(), "files": {}}
    for dtype in ("f32", "f16", "i8"):
        for salt, metric in enumerate(("cos", "ip", "l2")):
            index = leanclip.Index(DIM, metric=metric, dtype=dtype)
            index.add(np.array(KEYS, dtype=np.uint64), vectors(len(KEYS), DIM, salt))
            # A removal swaps the last row into the hole: the file's key order is not sorted.
            index.remove(np.array([3], dtype=np.uint64))
            name = f"{dtype}_{metric}.lcx"
            index.save(str(out / name))
            keys, scores = index.search(queries, k=K)
            expected["files"][name] = {
                "dtype": dtype,
                "metric": metric,
                "keys": sorted(int(k) for k in index.keys()),
                "vectors": {str(int(k)): v.tolist() for k, v in zip(index.keys(), index.get(index.keys()))},
                "search_keys": keys.astype(np.uint64).tolist(),
                "search_scores": scores.tolist(),
                "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(),
            }
    empty = leanclip.Index(DIM, metric="cos", dtype="f32")
    empty.save(str(out / "empty_f32_cos.lcx"))
    expected["files"]["empty_f32_cos.lcx"] = {
        "dtype": "f32", "metric": "cos", "keys": [], "vectors": {}, "search_keys": [[]] * 3,
        "search_scores": [[]] * 3,
        "sha256": hashlib.sha256((out / "empty_f32_cos.lcx").read_bytes()).hexdigest(),
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {len(expected['files'])} files of format version {version} to {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
