"""Near-duplicate groups: bursts, edited copies, re-saved JPEGs. Nothing is ever deleted.

How (``leanclip duplicates``, ``Gallery.duplicates``):

1. **Pairs, at index time, incrementally.** Each ``update()`` searches the neighbours of the
   photos it added (and only those) in the image-to-image space (the gallery's similarity
   index; the joint one for a model without it) and stores every pair scoring at least
   :data:`FLOOR` in the ``near`` table, in the same transaction as the vectors (kill-safe like
   the rest). A photo added later finds the earlier ones, so every pair is seen once. The
   search is the engine's batched top-k over blocks of queries, or, when the queries times the
   gallery exceed :data:`EXACT_BUDGET` (a first index of a large library), an IVF self-join: a
   temporary :class:`leanclip.IVFIndex` (i8 lists, ``nlist = sqrt(n)``) of the vectors projected
   on their :data:`PROJECT_DIMS` principal directions, probed at :data:`SELF_JOIN_NPROBE` lists
   (near-duplicates sit in the same or the next list), whose candidates are re-scored from the
   stored vectors. Never a Python loop over pairs.
2. **Groups, at query time.** The connected components of the pairs scoring at least the
   threshold (numpy label propagation, no Python loop over photos).
3. **The threshold is calibrated, not fixed** (Immich #31487: a fixed cut-off gives thousands of
   false duplicates in galleries whose photos are alike). ``--auto`` (the default) calibrates it
   per photo: each photo's *background* is the score of its :data:`BACKGROUND_RANK`-th nearest
   neighbour, which for all but the largest bursts is a different scene. A pair counts when its
   score is at least :data:`MIN_THRESHOLD` and at least :data:`MARGIN` above the background of
   *both* photos: in a run of look-alike photos (documents, one beach, a shoot) the bar rises
   with them, in a varied library it stays near the floor. The values are the best on the
   generated benchmark (benchmarks/results/gallery.md, "Near-duplicates"). ``--threshold T``
   is one fixed cut-off instead.
4. Backgrounds are measured when a photo's neighbours are searched (at its first index); a
   photo added later next to it is compared with its own background at that time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "FLOOR",
    "NEIGHBOURS",
    "Pairs",
    "neighbour_pairs",
    "components",
    "calibrated",
    "group_pairs",
]

FLOOR = 0.80  # pairs below this score are not stored (no useful threshold is below it)
NEIGHBOURS = 12  # neighbours searched per photo (the last is the background rank)
BACKGROUND_RANK = 5  # the neighbour whose score is a photo's "background"
MARGIN = 0.04  # a duplicate pair scores this much above both photos' backgrounds ...
MIN_THRESHOLD = 0.85  # ... and at least this
EXACT_BUDGET = 2_000_000_000  # query x gallery pairs scored exactly before switching to IVF
SELF_JOIN_NPROBE = 4
PROJECT_DIMS = 128  # the self-join ranks candidates in this many principal directions ...
RESCORE_EXTRA = 8  # ... searching this many more than it keeps, and re-scores from the stored
RESCORE_MARGIN = 0.08  # vectors those within this of the floor (the projection's error is smaller)
_BLOCK = 4096  # queries per search call


@dataclass
class Pairs:
    """Neighbour pairs (``a < b``, score) and each query photo's background score."""

    a: np.ndarray  # uint64
    b: np.ndarray  # uint64
    score: np.ndarray  # float32
    background: Dict[int, float]  # query key -> score of its BACKGROUND_RANK-th neighbour


def _projection(index: Any, keys: np.ndarray, dims: int) -> np.ndarray:
    """(dim, dims): the top principal directions (uncentred: those that keep the most of the
    inner products) of a seeded sample of the stored vectors, by a randomized range finder
    (two power iterations; an exact eigendecomposition of dim x dim costs seconds more)."""
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(keys, size=min(len(keys), 8192), replace=False))
    x = np.asarray(index.get(sample), dtype=np.float32)
    basis = rng.standard_normal((x.shape[1], min(x.shape[1], dims + 16))).astype(np.float32)
    for _ in range(2):
        basis, _ = np.linalg.qr(x.T @ (x @ basis))
    small = (x @ basis).T @ (x @ basis)
    _, vecs = np.linalg.eigh(small)
    return np.ascontiguousarray((basis @ vecs[:, ::-1])[:, :dims], dtype=np.float32)


def _maybe_project(x: np.ndarray, proj: Optional[np.ndarray]) -> np.ndarray:
    """``x`` projected and re-normalised: cosines within the principal subspace."""
    if proj is None:
        return x
    y = x @ proj
    return np.ascontiguousarray(y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12))


def _self_join(index: Any, keys: np.ndarray) -> Tuple[Any, Optional[np.ndarray]]:
    """A temporary IVF copy of ``index`` for a self-join over many queries: i8 lists of the
    vectors projected on their PROJECT_DIMS principal directions (nlist = sqrt(n)); its
    candidates are re-scored from the stored vectors. Returns (IVF index, projection or None)."""
    from leanclip import IVFIndex

    n = len(keys)
    proj = _projection(index, keys, PROJECT_DIMS) if index.dim > PROJECT_DIMS else None
    dim = PROJECT_DIMS if proj is not None else index.dim
    nlist = max(1, int(math.sqrt(n)))
    ivf = IVFIndex(
        dim, metric="cos", dtype="i8", nlist=nlist, nprobe=min(nlist, SELF_JOIN_NPROBE), train_threshold=0
    )
    sample = np.sort(np.random.default_rng(1).choice(keys, size=min(n, 16 * nlist), replace=False))
    ivf.train(_maybe_project(np.asarray(index.get(sample), dtype=np.float32), proj))
    for i in range(0, n, 16_384):
        chunk = keys[i : i + 16_384]
        ivf.add(chunk, _maybe_project(np.asarray(index.get(chunk), dtype=np.float32), proj))
    return ivf, proj


def neighbour_pairs(
    index: Any,
    query_keys: Sequence[int],
    *,
    floor: float = FLOOR,
    k: int = NEIGHBOURS,
    vectors: Optional[np.ndarray] = None,
) -> Pairs:
    """The pairs (query, neighbour) scoring at least ``floor`` among each query's ``k`` nearest
    other photos of ``index`` (see the module docstring for how they are searched).
    ``vectors``: the queries' vectors when the caller has them (else ``index.get``)."""
    q = np.asarray(query_keys, dtype=np.uint64)
    n = len(index)
    empty = np.zeros(0, np.uint64)
    if len(q) == 0 or n < 2:
        return Pairs(empty, empty.copy(), np.zeros(0, np.float32), {})
    kk = min(k + 1, n)  # + the photo itself
    searcher, proj = index, None
    if len(q) * n > EXACT_BUDGET:
        searcher, proj = _self_join(index, np.asarray(index.keys(), dtype=np.uint64))
    a_parts: List[np.ndarray] = []
    b_parts: List[np.ndarray] = []
    s_parts: List[np.ndarray] = []
    background: Dict[int, float] = {}
    block = _BLOCK if searcher is index else 512
    for i in range(0, len(q), block):
        qk = q[i : i + block]
        qv = vectors[i : i + block] if vectors is not None else index.get(qk)
        qv = np.asarray(qv, dtype=np.float32)
        if searcher is index:
            keys, scores = index.search(qv, kk)
            keys, scores = np.asarray(keys, dtype=np.uint64), np.asarray(scores, dtype=np.float32)
        else:
            # approximate candidates (cosines in the principal subspace); those that may reach
            # the floor, and each query's background rank, are re-scored from the stored vectors
            keys, scores = searcher.search(_maybe_project(qv, proj), min(n, kk + RESCORE_EXTRA))
            keys, scores = np.asarray(keys, dtype=np.uint64), np.asarray(scores, dtype=np.float32)
            near = scores >= floor - RESCORE_MARGIN
            near[:, min(BACKGROUND_RANK, keys.shape[1] - 1)] = True
            rows, cols = np.nonzero(near)
            uniq, inv = np.unique(keys[rows, cols], return_inverse=True)
            vecs = np.asarray(index.get(uniq), dtype=np.float32)
            scores[rows, cols] = np.einsum("pd,pd->p", qv[rows], vecs[inv])
            scores[~near] = np.minimum(scores[~near], floor - RESCORE_MARGIN)  # below the floor
            order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
            keys = np.take_along_axis(keys, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
        self_hit = keys == qk[:, None]
        # the background: the BACKGROUND_RANK-th neighbour other than the photo itself
        others = np.where(self_hit, -np.inf, scores)
        others = -np.sort(-others, axis=1)
        rank = min(BACKGROUND_RANK, kk - 1) - 1
        for key, bg in zip(qk.tolist(), others[:, rank].tolist()):
            background[int(key)] = float(bg) if math.isfinite(bg) else -1.0
        keep = ~self_hit & (scores >= floor)
        rows, cols = np.nonzero(keep)
        src, dst = qk[rows], keys[rows, cols]
        a_parts.append(np.minimum(src, dst))
        b_parts.append(np.maximum(src, dst))
        s_parts.append(scores[rows, cols])
    return Pairs(np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(s_parts), background)


def components(a: np.ndarray, b: np.ndarray) -> List[List[int]]:
    """Connected components (of two or more keys) of the graph with edges ``a[i] - b[i]``,
    each sorted, largest first: label propagation with pointer jumping, all in numpy."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    if len(a) == 0:
        return []
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ea, eb = inv[: len(a)], inv[len(a) :]
    label = np.arange(len(nodes))
    while True:
        lo = np.minimum(label[ea], label[eb])
        new = label.copy()
        np.minimum.at(new, ea, lo)
        np.minimum.at(new, eb, lo)
        new = new[new]  # pointer jumping: follow labels to their own labels
        if np.array_equal(new, label):
            break
        label = new
    order = np.argsort(label, kind="stable")
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    groups = [nodes[g].tolist() for g in np.split(order, cuts) if len(g) > 1]
    groups = [sorted(int(x) for x in g) for g in groups]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups


def calibrated(score: np.ndarray, bg_a: np.ndarray, bg_b: np.ndarray) -> np.ndarray:
    """Which pairs count under ``--auto``: score >= MIN_THRESHOLD and >= both backgrounds +
    MARGIN (see the module docstring)."""
    bar = np.maximum(np.maximum(bg_a, bg_b) + MARGIN, MIN_THRESHOLD)
    return np.asarray(score) >= bar


def group_pairs(a: np.ndarray, b: np.ndarray, score: np.ndarray, threshold: float) -> List[List[int]]:
    """Groups (connected components) of the pairs scoring at least ``threshold``."""
    keep = np.asarray(score) >= threshold
    return components(np.asarray(a)[keep], np.asarray(b)[keep])
