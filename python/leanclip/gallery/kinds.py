"""The gallery's index kinds: exact (:class:`leanclip.Index`) or IVF (:class:`leanclip.IVFIndex`).

The user's choice (``exact``, ``ivf`` or ``auto``) is kept in the store's meta as ``index``; the
kind of the committed index file as ``index_kind`` (committed with its generation, so a reader
always opens the file with the right class). ``auto`` is exact up to :data:`AUTO_IVF_THRESHOLD`
photos and IVF above it; it goes back to exact only below half the threshold, so a gallery
hovering around the threshold is not converted back and forth.

Why 200,000: an exact search reads every stored vector, so its cost grows linearly with the
library: the committed gallery benchmark (docs/gallery.md, "Numbers") has a text query at
1,000,000 photos at 64 ms p99 in f32 and 26 ms in i8, i.e. about 13 ms / 5 ms at 200,000 -- where
the scan starts to dominate a query. Below it, exact search is fast enough and exact, and an IVF
index could not train well (k-means wants tens of vectors per list; with ``nlist = 4 * sqrt(n)``
lists a gallery has fewer than 39 per list below ~25,000 photos). Above it, training costs
little next to encoding 200,000 photos, and a query scans a few percent of the vectors.

An IVF gallery keeps a target recall (``--recall``, default :data:`DEFAULT_RECALL`, kept in the
store's meta as ``recall``): after an update, :func:`keep_recall` tunes the index to it
(``IVFIndex.tune`` on held-out photos) when it is not tuned to it yet or its lists drifted (the
photo count moved by more than :data:`RETUNE_DRIFT` since the last tune, or a retrain).

Conversions reuse the stored vectors (``get`` from one index, ``add`` to the other): nothing is
re-encoded.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from leanclip.gallery.errors import GalleryError

__all__ = [
    "INDEX_CHOICES",
    "KINDS",
    "AUTO_IVF_THRESHOLD",
    "IVFLayout",
    "ivf_layout",
    "kind_of",
    "want_kind",
    "new_index",
    "load_index",
    "convert",
    "needs_rebuild",
    "keep_recall",
    "DEFAULT_RECALL",
]

INDEX_CHOICES = ("exact", "ivf", "auto")
KINDS = ("exact", "ivf")
AUTO_IVF_THRESHOLD = 200_000
_CHUNK = 32_768  # vectors moved per get/add during a conversion
SHORTLIST_MIN = 100  # IVF code-scan candidates re-scored per query, at least
DEFAULT_RECALL = 0.95  # recall@10 an IVF gallery is tuned to (``leanclip index --recall``)
RETUNE_DRIFT = 0.1  # re-tune once the photo count moved by this share since the last tune


class IVFLayout(NamedTuple):
    nlist: int
    nprobe: int
    train_threshold: int


def ivf_layout(n: int) -> IVFLayout:
    """IVF parameters for a gallery of ``n`` photos: ``nlist = 4 * sqrt(n)`` lists; ``nprobe =
    max(16, nlist / 16)`` lists scanned per query (about 6% of the vectors; recall@10 >= 0.999 on
    clustered synthetic data, not on unstructured data: the table in docs/gallery.md); training once it holds 39 vectors per list (the minimum
    k-means sample faiss recommends), so a small IVF gallery stays one exact list."""
    n = max(1, int(n))
    nlist = max(1, round(4 * math.sqrt(n)))
    nprobe = min(nlist, max(16, nlist // 16))
    return IVFLayout(nlist, nprobe, 39 * nlist)


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


def new_index(
    kind: str, dim: int, dtype: str, n: int, layout: Callable[[int], IVFLayout] = ivf_layout
) -> Any:
    """An empty index of ``kind`` sized for about ``n`` photos."""
    from leanclip import Index, IVFIndex

    if kind == "exact":
        return Index(dim, dtype=dtype)  # type: ignore[arg-type]
    p = layout(n)
    # 4-bit codes for the gallery's single text queries (one sub-quantizer per 4 dimensions),
    # re-scoring as many candidates as lists probed (at least SHORTLIST_MIN).
    pq = dim // 4 if dim % 8 == 0 else 0
    return IVFIndex(
        dim,
        dtype=dtype,  # type: ignore[arg-type]
        nlist=p.nlist,
        nprobe=p.nprobe,
        train_threshold=p.train_threshold,
        pq=pq,
        shortlist=max(SHORTLIST_MIN, p.nprobe) if pq else None,
    )


def load_index(path: "os.PathLike[str] | str", kind: str, mmap: bool = False) -> Any:
    """Open a saved index file of ``kind`` (the gallery's meta says which)."""
    from leanclip import Index, IVFIndex

    if kind == "ivf":
        return IVFIndex.load(os.fspath(path), mmap=mmap)
    if kind != "exact":
        raise GalleryError(f"the gallery's meta names an unknown index kind {kind!r}")
    return Index.load(os.fspath(path), mmap=mmap)


def needs_rebuild(index: Any, n: int, layout: Callable[[int], IVFLayout] = ivf_layout) -> bool:
    """An IVF index whose list count is off by 2x or more from the layout for ``n`` photos
    (the gallery grew or shrank a lot): rebuilt with the new layout (lists of the right size)."""
    if kind_of(index) != "ivf":
        return False
    want = layout(n).nlist
    return want >= 2 * index.nlist or 2 * want <= index.nlist


def convert(
    index: Any, kind: str, dtype: str, n: int, layout: Callable[[int], IVFLayout] = ivf_layout
) -> Any:
    """``index`` as ``kind`` with storage ``dtype`` (an IVF one laid out for ``n`` photos), its
    stored vectors moved across in chunks (``get`` / ``add``): nothing is re-encoded. Returns
    ``index`` itself when it already is what is asked."""
    if kind == kind_of(index) and dtype == index.dtype and not needs_rebuild(index, n, layout):
        return index
    if kind == "exact" and kind_of(index) == "exact":
        return index.astype(dtype)  # the engine converts the precision in place of a copy loop
    keys = np.asarray(index.keys(), dtype=np.uint64)
    out = new_index(kind, index.dim, dtype, max(n, len(keys)), layout)
    if kind == "ivf" and len(keys) >= out.train_threshold > 0:
        # train on a seeded sample of the whole gallery before adding, rather than on whichever
        # vectors happen to be added first
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(keys, size=min(len(keys), 64 * out.nlist), replace=False))
        out.train(np.asarray(index.get(sample), dtype=np.float32))
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        out.add(chunk, np.asarray(index.get(chunk), dtype=np.float32))
    return out


def set_search_nprobe(index: Any, nprobe: Optional[int]) -> None:
    """Apply a search-time ``nprobe`` to an IVF index (capped at its list count); with codes,
    the shortlist grows with it (as many candidates re-scored as lists probed, at least 100)."""
    if nprobe is not None and kind_of(index) == "ivf":
        index.nprobe = max(1, min(int(nprobe), index.nlist))
        if index.pq:
            index.shortlist = max(SHORTLIST_MIN, index.nprobe)


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
