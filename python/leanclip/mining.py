"""Hard negatives by id, for the training loop (paper: "Hard Negative Mining").

The engine's ``mine_hard_negatives`` works on rows; training code keeps examples by id (image
ids, caption ids). ``hard_negative_ids`` turns one into the other: it mines, for each query
embedding of one modality, the most similar corpus embeddings of the other modality over the
whole corpus, skips the query's positives, and returns corpus ids.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from leanclip._validate import as_groups, as_matrix, check_dtype, check_metric, check_positive_int

__all__ = ["hard_negative_ids"]


def _mine() -> Callable[..., Any]:
    from leanclip._engine import mine_hard_negatives

    return mine_hard_negatives


def _as_ids(ids: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the embeddings, got {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must fit in int64")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if out.size and int(out.min()) < 0:
        # -1 marks "no negative" in the result, so ids must be non-negative
        raise ValueError(f"{name} must be non-negative, got {int(out.min())}")
    return out


def _positive_sets(positives: Sequence[Any], q: int, cids: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Each query's explicit positives as sorted unique int64 ids, and how many more rows to
    mine so that k remain once they are dropped."""
    if len(positives) != q:
        raise ValueError(f"positives must have one entry per query ({q}), got {len(positives)}")
    pos_sets = []
    for i, p in enumerate(positives):
        p = list(p) if isinstance(p, (set, frozenset)) else p
        arr = np.asarray(p).reshape(-1)
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"positives[{i}] must hold integer corpus ids, got dtype {arr.dtype}")
        pos_sets.append(np.unique(arr.astype(np.int64)))
    # each corpus row holding a positive id can take one slot of the mined list: fetch that
    # many more (ids may repeat in the corpus, so count rows, not ids)
    extra = 0
    uniq, counts = np.unique(cids, return_counts=True)
    for pos in pos_sets:
        at = np.searchsorted(uniq, pos)
        hit = at < uniq.size
        hit[hit] = uniq[at[hit]] == pos[hit]
        extra = max(extra, int(counts[at[hit]].sum()))
    return pos_sets, extra


def _padded_result(q: int, k: int) -> np.ndarray:
    """The (q, k) int64 result, all -1, or a ValueError naming k when it cannot be allocated."""
    try:
        return np.full((q, k), -1, dtype=np.int64)
    except (MemoryError, ValueError):
        raise ValueError(
            f"k = {k} is too large: the ({q}, {k}) int64 result does not fit in memory"
        ) from None


def hard_negative_ids(
    query_ids: Any,
    query_embeddings: Any,
    corpus_ids: Any,
    corpus_embeddings: Any,
    k: int,
    query_groups: Any = None,
    corpus_groups: Any = None,
    *,
    positives: Optional[Sequence[Any]] = None,
    metric: str = "ip",
    dtype: str = "f32",
    precision: str = "f32",
) -> np.ndarray:
    """(q, k) int64 corpus ids of each query's hard negatives, hardest first, -1 padded.

    ``query_embeddings`` (q, d) and ``corpus_embeddings`` (n, d): float32 or float16 arrays (or
    anything numpy can convert, e.g. CPU torch tensors), typically one modality against the
    other. ``query_ids`` (q,) and ``corpus_ids`` (n,): non-negative integers (``query_ids`` is
    validated and kept for the caller's bookkeeping; the result holds corpus ids only).

    A query's positives are never returned:

    - ``query_groups`` (q,) / ``corpus_groups`` (n,): integer groups; a corpus row in the
      query's group is a positive (COCO: an image's group is its id, each of its five captions
      carries it). Both or neither. Skipped inside the engine, at no extra cost.
    - ``positives``: optionally, a length-q sequence of corpus-id collections, the explicit
      positives of each query (for pairings that groups cannot express).

    Ids are returned per corpus row: an id that several corpus rows carry (several embeddings
    of one image) appears once for each of those rows that ranks among the k hardest, and
    takes one slot each (deduplicate with ``np.unique`` if you want each id once). Where fewer
    than k corpus rows are eligible, the row is padded with -1. Scores follow
    ``metric`` ("ip": the usual choice for L2-normalized embeddings, "cos", or "l2");
    ``dtype`` ("f32", "f16" or "i8") and ``precision`` ("f32", "bf16" or "i8": the scan's
    precision, re-scored exactly at ``dtype``; see docs/mining.md) are passed to the engine's
    ``mine_hard_negatives``.
    """
    k = check_positive_int(k, "k")
    metric = check_metric(metric)
    dtype = check_dtype(dtype)
    # Shapes and types here; the values (NaN, inf, norms) are checked once, by the engine,
    # whose errors name the row as queries[i] / corpus[j].
    queries, _ = as_matrix(query_embeddings, None, "query_embeddings", keep_f16=True, check_finite=False)
    corpus, _ = as_matrix(
        corpus_embeddings,
        queries.shape[1],
        "corpus_embeddings",
        keep_f16=True,
        check_finite=False,
    )
    if queries.dtype != corpus.dtype:  # the engine takes one input type for both
        queries, corpus = queries.astype(np.float32), corpus.astype(np.float32)
    q, n = queries.shape[0], corpus.shape[0]
    _as_ids(query_ids, q, "query_ids")
    cids = _as_ids(corpus_ids, n, "corpus_ids")
    if (query_groups is None) != (corpus_groups is None):
        raise ValueError("give both query_groups and corpus_groups, or neither")
    qg = as_groups(query_groups, q, "query_groups")
    cg = as_groups(corpus_groups, n, "corpus_groups")

    pos_sets, extra = (None, 0) if positives is None else _positive_sets(positives, q, cids)
    out = _padded_result(q, k)
    if q == 0 or n == 0:
        # nothing to mine, but the values are still checked (by the engine, like any call)
        _mine()(queries, corpus, 1, metric=metric, dtype=dtype, precision=precision)
        return out
    fetch = min(k + extra, n)
    rows, _scores = _mine()(
        queries,
        corpus,
        fetch,
        query_groups=qg,
        corpus_groups=cg,
        metric=metric,
        dtype=dtype,
        precision=precision,
    )
    rows = np.asarray(rows, dtype=np.int64)
    ids = np.where(rows >= 0, cids[np.maximum(rows, 0)], -1)
    if pos_sets is None:
        out[:, : ids.shape[1]] = ids[:, :k]
        return out
    for i, pos in enumerate(pos_sets):
        keep = ids[i][(ids[i] >= 0) & ~np.isin(ids[i], pos)][:k]
        out[i, : keep.size] = keep
    return out
