"""Synthetic data shapes for the IVF benchmark, each generated from a seed (nothing downloaded).

Every shape returns unit vectors (inner product = cosine) and queries drawn from the same
process as the stored vectors but not stored (held out), so a recall measured on them is a
recall on data the index was not tuned on:

- ``clustered``: 512-d points around n/100 equally likely centers, isotropic noise (the shape
  of the earlier benchmark: tight clusters, no preferred directions);
- ``powerlaw``: 384-d mixture whose centers and within-cluster noise both have a power-law
  spectrum (variance of the i-th direction ~ 1/i, in a random basis), n/200 clusters of
  Zipf-distributed sizes (the largest ~100x the median): real embeddings' anisotropy with
  unbalanced lists;
- ``neardup``: the ``powerlaw`` process, but most stored vectors come in bursts of near
  duplicates (a photo library: 1-12 shots of one scene, cosine ~0.98 to each other); queries
  are new scenes;
- ``random``: uniform on the 512-d sphere, the worst case for every approximate index.

``more_queries(kind, n, nq, seed, stream)`` draws further queries of the same process from an
independent stream (``generate``'s own queries and the stored vectors unchanged): enough held-out
queries to measure a recall to +-0.003, however many were generated first.

The real-data shape (``minilm``) is ``benchmarks/data/minilm_embeddings.py``.

    python -m benchmarks.data.shapes powerlaw 200000   # prints the spectrum and list balance
"""

from __future__ import annotations

import sys
from typing import Tuple

import numpy as np

SHAPES = ("clustered", "powerlaw", "neardup", "random")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n: int, nq: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    dim = 512
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((max(n // 100, 10), dim)))

    def points(m: int, r: np.random.Generator) -> np.ndarray:
        labels = r.integers(0, len(centers), size=m)
        noise = r.standard_normal((m, dim), dtype=np.float32) * np.float32(0.6 / np.sqrt(dim))
        return _unit(centers[labels] + noise)

    return points(n, np.random.default_rng(seed + 1)), points(nq, np.random.default_rng(seed + 2))


class _PowerLawMixture:
    """Centers ~ N(0, R diag(1/i) R^T) plus a common offset (embeddings share a mean
    direction), members = center + noise with the same spectrum in another random basis,
    cluster weights Zipf(1.1)."""

    def __init__(self, n_clusters: int, dim: int, seed: int, spread: float = 0.55):
        rng = np.random.default_rng(seed)
        self.dim = dim
        scale = 1.0 / np.sqrt(np.arange(1, dim + 1, dtype=np.float64))
        scale /= np.linalg.norm(scale)  # total variance 1
        self.scale = scale.astype(np.float32)
        self.basis_c = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.basis_n = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        mean = _unit(rng.standard_normal((1, dim)))[0] * np.float32(0.5)
        self.centers = (
            mean + (rng.standard_normal((n_clusters, dim)).astype(np.float32) * self.scale) @ self.basis_c
        )
        w = 1.0 / np.arange(1, n_clusters + 1) ** 1.1
        self.weights = rng.permutation(w / w.sum())
        self.spread = np.float32(spread)

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.choice(len(self.centers), size=m, p=self.weights)
        noise = (rng.standard_normal((m, self.dim), dtype=np.float32) * self.scale) @ self.basis_n
        return _unit(self.centers[labels] + self.spread * noise)


def _powerlaw(n: int, nq: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    mix = _PowerLawMixture(max(n // 200, 8), 384, seed)
    return mix.sample(n, np.random.default_rng(seed + 1)), mix.sample(nq, np.random.default_rng(seed + 2))


def _neardup(n: int, nq: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    mix = _PowerLawMixture(max(n // 200, 8), 384, seed)
    rng = np.random.default_rng(seed + 1)
    # Bursts of 1..12 shots (mean ~4.5), until n vectors.
    sizes = []
    total = 0
    while total < n:
        s = min(int(rng.integers(1, 13)), n - total)
        sizes.append(s)
        total += s
    scenes = mix.sample(len(sizes), rng)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    # Near duplicates: cosine ~0.98 to the scene (noise of norm 0.2, isotropic).
    jitter = rng.standard_normal((n, mix.dim), dtype=np.float32) * np.float32(0.2 / np.sqrt(mix.dim))
    base = _unit(scenes[owner] + jitter)
    base = base[rng.permutation(n)]
    return base, mix.sample(nq, np.random.default_rng(seed + 2))


def _random(n: int, nq: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    base = _unit(np.random.default_rng(seed).standard_normal((n, 512), dtype=np.float32))
    queries = _unit(np.random.default_rng(seed + 1).standard_normal((nq, 512), dtype=np.float32))
    return base, queries


def generate(kind: str, n: int, nq: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(base (n, dim), queries (nq, dim)): float32 unit rows of the shape ``kind``, from
    ``seed`` (the same seed gives the same data)."""
    make = {"clustered": _clustered, "powerlaw": _powerlaw, "neardup": _neardup, "random": _random}
    if kind not in make:
        raise ValueError(f"unknown data shape {kind!r}; one of {', '.join(SHAPES)}")
    if n < 1 or nq < 0:
        raise ValueError(f"need n >= 1 and nq >= 0, got n={n}, nq={nq}")
    return make[kind](n, nq, seed)


def more_queries(kind: str, n: int, nq: int, seed: int = 0, stream: int = 1) -> np.ndarray:
    """(nq, dim) queries of the process ``generate(kind, n, ..., seed)`` samples (the same
    centers or mixture), drawn from stream ``stream`` >= 1: independent of ``generate``'s
    queries, of its stored vectors and of every other stream."""
    if kind not in SHAPES:
        raise ValueError(f"unknown data shape {kind!r}; one of {', '.join(SHAPES)}")
    if n < 1 or nq < 0 or stream < 1:
        raise ValueError(f"need n >= 1, nq >= 0 and stream >= 1, got n={n}, nq={nq}, stream={stream}")
    rng = np.random.default_rng([seed, stream])  # a sequence: never one of generate's int seeds
    if kind == "random":
        return _unit(rng.standard_normal((nq, 512), dtype=np.float32))
    if kind == "clustered":
        dim = 512
        centers = _unit(np.random.default_rng(seed).standard_normal((max(n // 100, 10), dim)))
        labels = rng.integers(0, len(centers), size=nq)
        noise = rng.standard_normal((nq, dim), dtype=np.float32) * np.float32(0.6 / np.sqrt(dim))
        return _unit(centers[labels] + noise)
    return _PowerLawMixture(max(n // 200, 8), 384, seed).sample(nq, rng)  # powerlaw, neardup


def main() -> None:
    kind, n = sys.argv[1], int(sys.argv[2])
    base, queries = generate(kind, n, 1000)
    sample = base[np.random.default_rng(0).choice(n, size=min(n, 20000), replace=False)]
    ev = np.linalg.eigvalsh(sample.T @ sample / len(sample))[::-1]
    kept = np.cumsum(ev) / ev.sum()
    print(
        f"{kind}: {base.shape}, variance kept by the top 1/4, 1/2, 3/4 directions: "
        f"{kept[len(ev) // 4 - 1]:.3f} {kept[len(ev) // 2 - 1]:.3f} {kept[3 * len(ev) // 4 - 1]:.3f}"
    )
    nn = np.sort(queries[:200] @ base.T, axis=1)[:, ::-1]
    print(f"query to neighbour cosine: 1st {nn[:, 0].mean():.3f}, 10th {nn[:, 9].mean():.3f}")


if __name__ == "__main__":
    main()
