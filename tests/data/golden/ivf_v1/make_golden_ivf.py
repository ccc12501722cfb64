"""Writes the golden IVF index files of this directory and expected.json (run from the repo
root with the built extension: python tests/data/golden/ivf_v1/make_golden_ivf.py). Only for a
new format version: committed files must keep loading with the recorded results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from leanclip import IVFIndex

HERE = Path(__file__).resolve().parent
DIM = 4
K = 3
CASES = {
    # name: (metric, dtype, rerank, trained, pq): pq > 0 files hold 4-bit codes (and a
    # shortlist of 3 = k, so the codes choose the results)
    "f32_cos.lcivf": ("cos", "f32", 0, True, 0),
    "f16_ip.lcivf": ("ip", "f16", 0, True, 0),
    "i8_l2_rerank.lcivf": ("l2", "i8", 5, True, 0),
    "i8_cos_untrained.lcivf": ("cos", "i8", 0, False, 0),
    "i8_ip_codes.lcivf": ("ip", "i8", 0, True, 2),
}


def main() -> None:
    # small integers: f32 and f16 store them exactly (i8 up to its per-vector scale)
    rng = np.random.default_rng(2026)
    vectors = rng.integers(-4, 5, size=(24, DIM)).astype(np.float32)
    vectors[np.all(vectors == 0, axis=1)] = 1.0
    keys = (np.arange(24, dtype=np.uint64) * 1_000_003 + 7).astype(np.uint64)
    queries = rng.integers(-4, 5, size=(3, DIM)).astype(np.float32)
    queries[np.all(queries == 0, axis=1)] = 1.0
    out = {"format_version": 1, "dim": DIM, "k": K, "queries": queries.tolist(), "files": {}}
    for name, (metric, dtype, rerank, trained, pq) in CASES.items():
        codes = {"pq": pq, "shortlist": K} if pq else {}
        index = IVFIndex(
            DIM, metric, dtype, nlist=3, nprobe=3, rerank=rerank, seed=11, train_threshold=0, **codes
        )
        index.add(keys, vectors)
        if trained:
            index.train(vectors)
        index.remove(keys[::5])
        index.save(HERE / name)
        found, scores = index.search(queries, k=K)
        kept = index.keys()
        out["files"][name] = {
            "metric": metric,
            "dtype": dtype,
            "rerank": rerank,
            "pq": pq,
            "trained": trained,
            "nlist": 3,
            "list_sizes": index.list_sizes().tolist(),
            "keys": sorted(int(k) for k in kept),
            "vectors": {str(int(k)): v for k, v in zip(kept, index.get(kept).tolist())},
            "search_keys": found.tolist(),
            "search_scores": scores.tolist(),
        }
    (HERE / "expected.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
