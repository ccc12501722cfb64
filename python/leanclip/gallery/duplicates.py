"""Near-duplicate groups: bursts, edited copies, re-saved JPEGs. Nothing is ever deleted.

How (``leanclip duplicates``, ``Gallery.duplicates``):

1. **Pairs, at index time, incrementally.** Each ``update()`` searches the neighbours of the
   photos it added (and only those) in the image-to-image space (the gallery's similarity
   index; the joint one for a model without it) and stores the pairs worth storing (3.), with
   both their scores, in the ``near`` table, in the same transaction as the vectors (kill-safe
   like the rest). A photo added later finds the earlier ones, so every pair is seen once. The
   search is the engine's batched top-k over blocks of queries, or, when the queries times the
   gallery exceed :data:`EXACT_BUDGET` (a first index of a large library), an IVF self-join: a
   temporary :class:`leanclip.IVFIndex` of the stored vectors (f16 lists, ``nlist = 2 sqrt(n)``)
   probed at :data:`SELF_JOIN_NPROBE` lists (near-duplicates sit in the same or the next list),
   in batches of :data:`_BLOCK` queries; its scores are the stored f16 vectors' own. Never a
   Python loop over pairs.
2. **Groups, at query time.** The connected components of the pairs scoring at least the
   threshold (numpy label propagation, no Python loop over photos).
3. **A second signal, the look** (:func:`look`): each photo's 8 x 8 colour thumbnail, centred
   and normalised (192 numbers, stored per photo at index time, table ``looks``). Its cosine
   between two photos (stored with their pair) says whether the *pixels* are laid out alike:
   it survives what the model's space does not (heavy JPEG re-encodes, downscales: 10% of
   such true pairs score below 0.82 there) and tells apart what that space confuses (tiles of
   one texture, look-alike scenes). Pairs are stored when the model scores them at least
   :data:`FLOOR`, or at least :data:`LOOK_FLOOR` with a look of at least :data:`LOOK_MIN`.
4. **The threshold is calibrated, not fixed** (Immich #31487: a fixed cut-off gives thousands of
   false duplicates in galleries whose photos are alike). ``--auto`` (the default) calibrates it
   per photo: each photo's *background* is the score of its :data:`BACKGROUND_RANK`-th nearest
   neighbour, which for all but the largest bursts is a different scene. A pair counts
   (:func:`calibrated`) when its score is at least :data:`MIN_THRESHOLD` and at least
   :data:`MARGIN` above the background of *both* photos, and its look does not contradict it
   (at least :data:`LOOK_VETO`); or when it looks the same (look at least :data:`LOOK_MIN`)
   and the model agrees loosely (at least :data:`LOOK_FLOOR`). In a run of look-alike photos
   (documents, one beach, a shoot) the model's bar rises with them, in a varied library it
   stays near the floor. The values are chosen on one generated set and checked on others
   (benchmarks/results/photos.md, "Near-duplicates"). ``--threshold T`` is one fixed cut-off
   on the model's score instead. Photos indexed before looks existed (schema 3) have none:
   their pairs are judged by the model's rule alone until they are indexed again.
5. Backgrounds are measured when a photo's neighbours are searched (at its first index); a
   photo added later next to it is compared with its own background at that time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    "FLOOR",
    "LOOK_FLOOR",
    "LOOK_MIN",
    "NEIGHBOURS",
    "look",
    "look_scores",
    "worth_storing",
    "Pairs",
    "neighbour_pairs",
    "components",
    "calibrated",
    "group_pairs",
]

FLOOR = 0.80  # pairs below this score are stored only when they look alike (worth_storing)
NEIGHBOURS = 12  # neighbours searched per photo (the last is the background rank)
BACKGROUND_RANK = 5  # the neighbour whose score is a photo's "background"
MARGIN = 0.04  # a duplicate pair scores this much above both photos' backgrounds ...
MIN_THRESHOLD = 0.88  # ... and at least this ...
LOOK_VETO = 0.5  # ... and their looks are at least this alike; or:
LOOK_MIN = 0.90  # their looks are at least this alike ...
LOOK_FLOOR = 0.60  # ... and the model scores them at least this
LOOK_SIDE = 8  # the look: a LOOK_SIDE x LOOK_SIDE colour thumbnail
EXACT_BUDGET = 400_000_000  # query x gallery pairs scored exactly before the IVF self-join (the crossover
# measured at 100k x 1280 f16: 4,096 queries exactly cost 10.5 CPU s, the whole self-join 10)
SELF_JOIN_NPROBE = 6  # lists a self-join probes (near-duplicates sit in the same or the next)
_BLOCK = 8192  # queries per search call (a batch scans each IVF list once for all)


@dataclass
class Pairs:
    """Neighbour pairs (``a < b``, score) and each query photo's background score."""

    a: np.ndarray  # uint64
    b: np.ndarray  # uint64
    score: np.ndarray  # float32
    background: Dict[int, float]  # query key -> score of its BACKGROUND_RANK-th neighbour


def look(img: Any) -> np.ndarray:
    """The look of a decoded RGB image (see the module docstring): float16 (LOOK_SIDE^2 * 3,),
    its LOOK_SIDE x LOOK_SIDE box-filtered thumbnail, centred on its mean and of unit norm
    (zero for a flat image). Brightness and contrast edits barely move it; layout does."""
    from PIL import Image

    small = img.convert("RGB").resize((LOOK_SIDE, LOOK_SIDE), Image.Resampling.BOX)
    x = np.asarray(small, dtype=np.float32).reshape(-1)
    x = x - x.mean()
    norm = float(np.linalg.norm(x))
    return (x / norm if norm > 1e-3 else np.zeros_like(x)).astype(np.float16)


def look_scores(a: np.ndarray, b: np.ndarray, looks: Dict[int, np.ndarray]) -> np.ndarray:
    """The look cosine of each pair ``(a[i], b[i])``; NaN where a photo has no look."""
    width = LOOK_SIDE * LOOK_SIDE * 3
    have = np.fromiter(looks.keys(), dtype=np.uint64, count=len(looks))
    order = np.argsort(have)
    have = have[order]
    table = np.full((len(have) + 1, width), np.nan, dtype=np.float32)  # the last row: no look
    if len(have):
        table[:-1] = np.stack(list(looks.values()))[order].astype(np.float32)

    def rows(keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(have, keys), max(len(have) - 1, 0))
        found = (pos < len(have)) & (have[pos] == keys) if len(have) else np.zeros(len(keys), bool)
        return table[np.where(found, pos, len(have))]

    return np.einsum("pd,pd->p", rows(a), rows(b)).astype(np.float32)


def worth_storing(score: np.ndarray, look_score: np.ndarray) -> np.ndarray:
    """Which candidate pairs are kept: scored at least FLOOR by the model, or at least
    LOOK_FLOOR with looks at least LOOK_MIN alike (no useful rule reaches below)."""
    with np.errstate(invalid="ignore"):
        return (np.asarray(score) >= FLOOR) | ((np.asarray(score) >= LOOK_FLOOR) & (look_score >= LOOK_MIN))


@dataclass
class _SelfJoin:
    """A temporary IVF copy of the gallery for a self-join over many queries: f16 lists
    (nlist = 2 sqrt(n), trained on 8 vectors a list), probed at SELF_JOIN_NPROBE lists. A batch
    ranks with the engine's i8 copy and re-scores its best from the f16 rows: the scores are
    those of the gallery's own f16 index, nothing is re-scored here."""

    ivf: Any

    @classmethod
    def build(cls, index: Any) -> "_SelfJoin":
        from leanclip import IVFIndex

        keys = np.sort(np.asarray(index.keys(), dtype=np.uint64))
        n = len(keys)
        nlist = max(1, int(2 * math.sqrt(n)))
        ivf = IVFIndex(
            index.dim,
            metric="cos",
            dtype="f16",
            nlist=nlist,
            nprobe=min(nlist, SELF_JOIN_NPROBE),
            train_threshold=0,
        )
        sample = np.sort(np.random.default_rng(1).choice(keys, size=min(n, 8 * nlist), replace=False))
        ivf.train(np.asarray(index.get(sample), dtype=np.float32))
        for i in range(0, n, 16_384):  # each stored vector is read once
            ivf.add(keys[i : i + 16_384], np.asarray(index.get(keys[i : i + 16_384]), dtype=np.float32))
        return cls(ivf)


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
    join = _SelfJoin.build(index) if len(q) * n > EXACT_BUDGET else None
    a_parts: List[np.ndarray] = []
    b_parts: List[np.ndarray] = []
    s_parts: List[np.ndarray] = []
    background: Dict[int, float] = {}
    for i in range(0, len(q), _BLOCK):
        qk = q[i : i + _BLOCK]
        qv = np.asarray(vectors[i : i + _BLOCK] if vectors is not None else index.get(qk), dtype=np.float32)
        if join is None:
            keys, scores = index.search(qv, kk)
        else:
            keys, scores = join.ivf.search(qv, kk)
        keys, scores = np.asarray(keys, dtype=np.uint64), np.asarray(scores, dtype=np.float32)
        self_hit = keys == qk[:, None]
        # the background: the BACKGROUND_RANK-th neighbour other than the photo itself
        others = np.where(self_hit, -np.inf, scores)
        others = -np.sort(-others, axis=1)
        bg = others[:, min(BACKGROUND_RANK, kk - 1) - 1]
        background.update(zip(qk.tolist(), np.where(np.isfinite(bg), bg, -1.0).tolist()))
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


def calibrated(
    score: np.ndarray, bg_a: np.ndarray, bg_b: np.ndarray, look_score: Optional[np.ndarray] = None
) -> np.ndarray:
    """Which pairs count under ``--auto`` (see the module docstring): the model's score is at
    least MIN_THRESHOLD and both backgrounds + MARGIN, and the look at least LOOK_VETO; or the
    look is at least LOOK_MIN and the score at least LOOK_FLOOR. A NaN look (a photo without
    one) leaves the model's rule alone."""
    score = np.asarray(score, dtype=np.float64)
    bar = np.maximum(np.maximum(bg_a, bg_b) + MARGIN, MIN_THRESHOLD)
    if look_score is None:
        return score >= bar
    t = np.asarray(look_score, dtype=np.float64)
    known = ~np.isnan(t)
    t = np.where(known, t, -np.inf)
    by_model = (score >= bar) & (~known | (t >= LOOK_VETO))
    return by_model | ((t >= LOOK_MIN) & (score >= LOOK_FLOOR))


def group_pairs(a: np.ndarray, b: np.ndarray, score: np.ndarray, threshold: float) -> List[List[int]]:
    """Groups (connected components) of the pairs scoring at least ``threshold``."""
    keep = np.asarray(score) >= threshold
    return components(np.asarray(a)[keep], np.asarray(b)[keep])
