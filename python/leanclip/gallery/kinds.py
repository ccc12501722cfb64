"""The gallery's index kinds: exact (:class:`leanclip.Index`) or IVF (:class:`leanclip.IVFIndex`).

The user's choice (``exact``, ``ivf`` or ``auto``) is kept in the store's meta as ``index``; the
kind of the committed index file as ``index_kind`` (committed with its generation, so a reader
always opens the file with the right class). ``auto`` is exact up to :data:`AUTO_IVF_THRESHOLD`
photos and IVF above it; it goes back to exact only below half the threshold, so a gallery
hovering around the threshold is not converted back and forth.

Why 200,000: an exact search reads every stored vector, so its cost grows linearly with the
library: the committed gallery benchmark (docs/gallery.md, "Numbers") has a text query at
1,000,000 photos at 64 ms p99 in f32 and 26 ms in i8, i.e. about 13 ms / 5 ms at 200,000 -- where
the scan starts to dominate a query. Below it, exact search is fast enough and exact (an IVF index
trains itself only from 65,536 vectors: one exact list before). Above it, training costs little
next to encoding 200,000 photos, and a query scans a few percent of the vectors.

An IVF gallery is laid out by :class:`leanclip.IVFIndex` itself (docs/ivf.md, "Say the recall you
need"): the gallery gives its storage precision (``--precision``: the vectors a conversion moves
back to an exact index keep it, so the index does not pick a coarser one) and nothing else; the
index chooses ``nlist`` from the photo count when it trains, codes and ``scan_dims`` from the
spectrum, and :func:`keep_recall` tunes it to the gallery's target recall (``--recall``, default
:data:`DEFAULT_RECALL`, kept in the store's meta as ``recall``; ``IVFIndex.tune`` on held-out
photos) when it is not tuned to it yet or its lists drifted (the photo count moved by more than
:data:`RETUNE_DRIFT` since the last tune). :func:`keep_layout` retrains it (``nlist``, codes and
``scan_dims`` chosen again) once the photo count has doubled or halved since it was trained. An
IVF index from before (laid out by hand: ``nlist = 4 sqrt(n)``; the meta has no ``ivf_layout``)
opens and searches as it is, and the next update converts it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from leanclip.gallery.errors import GalleryError

__all__ = [
    "INDEX_CHOICES",
    "KINDS",
    "AUTO_IVF_THRESHOLD",
    "AUTO_LAYOUT",
    "kind_of",
    "want_kind",
    "new_index",
    "load_index",
    "convert",
    "keep_layout",
    "keep_recall",
    "DEFAULT_RECALL",
]

INDEX_CHOICES = ("exact", "ivf", "auto")
KINDS = ("exact", "ivf")
AUTO_IVF_THRESHOLD = 200_000
_CHUNK = 32_768  # vectors moved per get/add during a conversion
SHORTLIST_MIN = 100  # IVF code-scan candidates re-scored per query when nprobe is given, at least
DEFAULT_RECALL = 0.95  # recall@10 an IVF gallery is tuned to (``leanclip index --recall``)
RETUNE_DRIFT = 0.1  # re-tune once the photo count moved by this share since the last tune
RETRAIN_GROWTH = 2  # retrain once the photo count grew or shrank by this factor since training
AUTO_LAYOUT = "auto"  # meta ``ivf_layout`` of an IVF index laid out by IVFIndex itself


def kind_of(index: Any) -> str:
    from leanclip import IVFIndex

    return "ivf" if isinstance(index, IVFIndex) else "exact"


def want_kind(choice: str, current: str, n: int, threshold: int = AUTO_IVF_THRESHOLD) -> str:
    """The kind a gallery of ``n`` photos should have under ``choice`` (``auto``: IVF above
    ``threshold``, exact again only below half of it)."""
    if choice in KINDS:
        return choice
    if choice != "auto":
        raise GalleryError(f"index kind must be one of {', '.join(map(repr, INDEX_CHOICES))}, got {choice!r}")
    if n > threshold:
        return "ivf"
    if current == "ivf" and n > threshold // 2:
        return "ivf"
    return "exact"


def new_index(kind: str, dim: int, dtype: str, train_at: Optional[int] = None) -> Any:
    """An empty index of ``kind`` storing ``dtype`` vectors. An IVF one chooses its own layout
    when it trains: once it holds ``train_at`` vectors (None: IVFIndex's own threshold,
    65,536; 0: only when :func:`convert` / :func:`keep_layout` retrain it). Until then it is
    one list and searches are exact."""
    from leanclip import Index, IVFIndex

    if kind == "exact":
        return Index(dim, dtype=dtype)  # type: ignore[arg-type]
    return IVFIndex(dim, dtype=dtype, train_threshold=train_at)  # type: ignore[arg-type]


def load_index(path: "os.PathLike[str] | str", kind: str, mmap: bool = False) -> Any:
    """Open a saved index file of ``kind`` (the gallery's meta says which)."""
    from leanclip import Index, IVFIndex

    if kind == "ivf":
        return IVFIndex.load(os.fspath(path), mmap=mmap)
    if kind != "exact":
        raise GalleryError(f"the gallery's meta names an unknown index kind {kind!r}")
    return Index.load(os.fspath(path), mmap=mmap)


def convert(
    index: Any, kind: str, dtype: str, auto_layout: bool = True, train_at: Optional[int] = None
) -> Any:
    """``index`` as ``kind`` with storage ``dtype``, its stored vectors moved across in chunks
    (``get`` / ``add``): nothing is re-encoded. An IVF index laid out by hand (``auto_layout``
    False: a store from before the automatic layout) becomes an automatic one. Returns
    ``index`` itself when it already is what is asked."""
    if kind == kind_of(index) and dtype == index.dtype and (kind == "exact" or auto_layout):
        return index
    if kind == "exact" and kind_of(index) == "exact":
        return index.astype(dtype)  # the engine converts the precision in place of a copy loop
    keys = np.asarray(index.keys(), dtype=np.uint64)
    out = new_index(kind, index.dim, dtype, train_at)
    # enough to train: add everything as one list, then train once on a sample of all of it
    # (nlist chosen from the whole count), rather than on whichever vectors come first
    train_now = kind == "ivf" and len(keys) >= out.train_threshold > 0
    if train_now:
        out = new_index(kind, index.dim, dtype, 0)
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        out.add(chunk, np.asarray(index.get(chunk), dtype=np.float32))
    if train_now:
        out.retrain()
    return out


def set_search_nprobe(index: Any, nprobe: Optional[int]) -> None:
    """Apply a search-time ``nprobe`` to an IVF index (capped at its list count); with codes,
    the shortlist grows with it (as many candidates re-scored as lists probed, at least 100)."""
    if nprobe is not None and kind_of(index) == "ivf":
        index.nprobe = max(1, min(int(nprobe), index.nlist))
        if index.pq:
            index.shortlist = max(SHORTLIST_MIN, index.nprobe)


def keep_layout(index: Any, trained_at: Optional[int]) -> Optional[int]:
    """Retrain a trained IVF ``index`` (its lists, and the layout it chooses: ``nlist`` from
    the count, codes and ``scan_dims`` from the spectrum) when it trained itself as it grew
    (``trained_at`` None: on the first vectors added, in path order) or its photo count has
    grown or shrunk by :data:`RETRAIN_GROWTH` since ``trained_at``. Returns the count it
    retrained at (its tuning is then stale), or None when nothing was done."""
    if kind_of(index) != "ivf" or not index.is_trained:
        return None
    n = len(index)
    if trained_at and trained_at / RETRAIN_GROWTH < n < trained_at * RETRAIN_GROWTH:
        return None
    index.retrain()
    return n


def keep_recall(index: Any, recall: float, tuned_at: Optional[int]) -> Optional[int]:
    """Tune an IVF ``index`` to ``recall`` (recall@10, ``IVFIndex.tune`` on held-out photos)
    unless it is tuned to it already and its lists have not drifted: the photo count is within
    :data:`RETUNE_DRIFT` of ``tuned_at`` (the count at the last tune; None: never). Returns the
    count it tuned at, or None when nothing was done (an exact or untrained index, or still
    tuned)."""
    if not 0.0 < recall <= 1.0:
        raise GalleryError(f"recall must be in (0, 1], got {recall!r}")
    if kind_of(index) != "ivf" or not index.is_trained or len(index) <= 64:
        return None
    n = len(index)
    tuned = index.tuned
    same = tuned is not None and abs(tuned[0] - recall) < 1e-6
    if same and tuned_at and abs(n - tuned_at) <= RETUNE_DRIFT * tuned_at:
        return None
    index.tune(recall, k=10)
    return n
