"""From query vectors to hits: search the committed index, keep what passes the filter (looking
deeper when the filter leaves too few), and add each hit's matched text and the date order.
A query of ``text:`` terms alone has no vector: its hits are the photos whose text matches."""

from __future__ import annotations

import fnmatch
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from leanclip.encoder import JOINT, SIMILARITY
from leanclip.gallery import store as db
from leanclip.gallery import texts
from leanclip.gallery.errors import GalleryError
from leanclip.gallery.filters import Filter
from leanclip.gallery.query import Hit
from leanclip.gallery.reader import Reader
from leanclip.gallery.store import display
from leanclip.gallery.vectors import QueryVector

__all__ = ["text_hits", "vector_hits", "hit"]

Rows = Dict[int, Tuple[bytes, Optional[int], Optional[int]]]  # key: (path, taken, frame ms)


def text_hits(reader: Reader, filt: Filter, k: int, min_score: Optional[float]) -> List[Hit]:
    """A query of ``text:`` terms alone: every photo whose text matches, score 1.0, in the
    order they were indexed (a negative-only query has nothing to rank: no hits)."""
    if not filt.allowed:
        return []
    keys = sorted(filt.allowed)
    with reader.lock:
        rows = db.hit_rows(reader.connection(), keys)
    found: List[Hit] = []
    for key in keys:
        if min_score is not None and 1.0 < min_score:
            break
        h = hit(reader, key, 1.0, rows, filt)
        if h is not None:
            found.append(h)
            if len(found) == k:
                break
    return _finish(reader, found, filt)


def vector_hits(
    reader: Reader, queries: Sequence[QueryVector], k: int, min_score: Optional[float], filt: Filter
) -> List[List[Hit]]:
    """The top-``k`` hits of each query that pass ``filt``, its own keys left out; one index
    search for the queries of each space."""
    out: List[List[Hit]] = [[] for _ in queries]
    for space in (JOINT, SIMILARITY):  # one index search per space
        idx = [j for j, q in enumerate(queries) if q.space == space]
        if idx:
            vecs = np.stack([queries[j].vector for j in idx])
            got = _search(reader, vecs, [queries[j].own for j in idx], k, min_score, filt, space)
            for j, hits in zip(idx, got):
                out[j] = hits
    return out


def _search(
    reader: Reader,
    qv: np.ndarray,
    excludes: List[List[int]],
    k: int,
    min_score: Optional[float],
    filt: Filter,
    space: str,
) -> List[List[Hit]]:
    index, sim_index, _ = reader.snapshots(similar=space == SIMILARITY)
    if space == SIMILARITY:
        if sim_index is None:
            raise GalleryError("the gallery's image-to-image index went away during the query; retry it")
        index = sim_index
    total = len(index)
    if total == 0:
        return [[] for _ in excludes]
    results: List[Optional[List[Hit]]] = [None] * len(excludes)
    todo = list(range(len(excludes)))
    want = k + max(len(e) for e in excludes)
    while todo:
        kk = min(total, want)
        with reader.guard():
            keys, scores = index.search(qv[todo], kk)
        keys, scores = np.asarray(keys), np.asarray(scores)
        with reader.lock:
            rows = db.hit_rows(reader.connection(), np.unique(keys).tolist())
        unfinished = []
        for row_i, qi in enumerate(todo):
            hits, below = _keep(
                reader, keys[row_i], scores[row_i], set(excludes[qi]), k, min_score, rows, filt
            )
            if len(hits) == k or below or kk >= total:
                results[qi] = hits
            else:  # filters left too few: look deeper
                unfinished.append(qi)
        todo = unfinished
        want = kk * 4
    return [_finish(reader, r, filt) if r is not None else [] for r in results]


def _keep(
    reader: Reader,
    keys: np.ndarray,
    scores: np.ndarray,
    skip: set,
    k: int,
    min_score: Optional[float],
    rows: Rows,
    filt: Filter,
) -> Tuple[List[Hit], bool]:
    """The first ``k`` hits of one query's results that pass, and whether a score fell below
    ``min_score`` (nothing further down can pass)."""
    hits: List[Hit] = []
    for key, score in zip(keys.tolist(), scores.tolist()):
        if min_score is not None and score < min_score:
            return hits, True
        if key in skip:  # the query image
            continue
        h = hit(reader, int(key), score, rows, filt)  # None: removed since, or filtered
        if h is None:
            continue
        hits.append(h)
        if len(hits) == k:
            break
    return hits, False


def hit(reader: Reader, key: int, score: float, rows: Rows, filt: Filter) -> Optional[Hit]:
    """The hit for ``key`` if its row exists and passes the filter, else None."""
    row = rows.get(int(key))
    if row is None:
        return None
    rel, taken, ms = row
    if (filt.allowed is not None and key not in filt.allowed) or key in filt.banned:
        return None
    if filt.kind is not None and (ms is None) != (filt.kind == "photo"):
        return None
    if filt.after is not None and (taken is None or taken < filt.after):
        return None
    if filt.before is not None and (taken is None or taken >= filt.before):
        return None
    name = display(rel)
    if filt.paths and not any(fnmatch.fnmatchcase(name, p) for p in filt.paths):
        return None
    t = None if ms is None else ms / 1000.0
    return Hit(reader.layout.root / os.fsdecode(rel), name, float(score), int(key), taken, None, t)


def _finish(reader: Reader, hits: List[Hit], filt: Filter) -> List[Hit]:
    """The matched text of each hit (for a query with text terms), and the date order."""
    if filt.words and hits:
        with reader.lock:
            found = texts.bodies(reader.connection(), [h.key for h in hits])
        for h in hits:
            if h.key in found:
                h.text = texts.highlight(found[h.key], filt.words)
    if filt.sort == "date":
        hits.sort(key=lambda h: (h.taken is None, -(h.taken or 0)))
    return hits
