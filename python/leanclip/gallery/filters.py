"""What a hit must pass besides its score: path globs, a capture-date range, the kind of file,
and the ``text:`` terms of a query (resolved here to the keys whose text matches)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set, Union

from leanclip.dates import parse_bound
from leanclip.gallery import store as db
from leanclip.gallery import texts
from leanclip.gallery.errors import GalleryError
from leanclip.gallery.query import Term
from leanclip.gallery.reader import Reader

__all__ = ["Filter", "make_filter"]


@dataclass
class Filter:
    """What a hit must pass besides its score: path globs, a capture-date range, text terms."""

    paths: List[str]
    after: Optional[int] = None  # wall seconds, inclusive
    before: Optional[int] = None  # wall seconds, exclusive
    sort: str = "score"
    words: List[str] = field(default_factory=list)  # the positive text terms
    allowed: Optional[Set[int]] = None  # keys whose text matches the positive text terms
    banned: Set[int] = field(default_factory=set)  # keys whose text matches a negative one
    kind: Optional[str] = None  # "photo" or "video" (frames of clips) only


def make_filter(
    reader: Reader,
    paths: Optional[Sequence[str]],
    after: Union[str, int, None],
    before: Union[str, int, None],
    sort: str,
    text_terms: Sequence[Term],
    kind: Optional[str] = None,
) -> Filter:
    """The filter of a search's keywords and its ``text:`` terms (``text_terms``)."""
    if sort not in ("score", "date"):
        raise GalleryError(f"sort must be 'score' or 'date', got {sort!r}")
    if kind not in (None, "", "photo", "video"):
        raise GalleryError(f"kind must be 'photo' or 'video', got {kind!r}")
    lo, hi = _bound(after, "after"), _bound(before, "before")
    filt = Filter(list(paths or []), lo, hi, sort, kind=kind or None)
    if lo is not None or hi is not None or sort == "date" or text_terms:
        with reader.lock:
            if not db.has_dates(reader.connection()):
                raise GalleryError(
                    "this gallery has no capture dates or text yet (indexed by an older leanclip); "
                    f"run `leanclip index {reader.layout.root}` to add them"
                )
    if text_terms:
        filt.words = [t.value for t in text_terms if t.sign > 0]
        with reader.lock:
            filt.allowed, filt.banned = texts.matching_keys(
                reader.connection(), filt.words, [t.value for t in text_terms if t.sign < 0]
            )
    return filt


def _bound(value: Union[str, int, None], what: str) -> Optional[int]:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise GalleryError(f"--{what} must be a date, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return parse_bound(str(value))
    except ValueError as exc:
        raise GalleryError(f"--{what}: {exc}") from None
