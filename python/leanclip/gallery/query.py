"""Query syntax and search results.

Unsigned words form one phrase; ``+term`` adds and ``-term`` subtracts a term; quotes group
words; ``img:PATH`` makes a term an image; ``text:"WORDS"`` matches the text read in the photos
(``leanclip index --ocr``): unsigned or ``+``, a photo must contain those words in that order;
``-``, it must not. Text terms filter, the other terms rank::

    beach at night +sunset -people +img:photos/dog.jpg -"city lights"
    receipt text:"total 42.50" -text:void
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from leanclip.gallery.errors import GalleryError

__all__ = ["Hit", "Term", "parse_query", "MAX_QUERY_CHARS"]

MAX_QUERY_CHARS = 4096


@dataclass(frozen=True)
class Term:
    sign: int  # +1 or -1
    # "text"; "image" (value: a file path); "photo" (value: the key of an indexed photo);
    # "ocr" (value: words that must, or with sign -1 must not, be in the photo's text)
    kind: str
    value: str


@dataclass
class Hit:
    """One search result."""

    path: Path  # absolute path of the file
    name: str  # path relative to the gallery root, printable
    score: float
    key: int
    taken: Optional[int] = None  # capture time, wall-clock seconds (leanclip.dates)
    text: Optional[str] = None  # the text read in the photo around the words a text: term matched
    t: Optional[float] = None  # for a frame of a video clip: its time in the clip, in seconds

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "path": str(self.path),
            "name": self.name,
            "score": round(self.score, 6),
            "key": self.key,
        }
        if self.taken is not None:
            from leanclip.dates import format_wall

            out["taken"] = format_wall(self.taken)
        if self.text is not None:
            out["text"] = self.text
        if self.t is not None:
            out["t"] = round(self.t, 3)
        return out


def parse_query(query: str) -> List[Term]:
    """Parse the query syntax described in the module docstring into terms."""
    if len(query) > MAX_QUERY_CHARS:
        raise GalleryError(f"query is longer than {MAX_QUERY_CHARS} characters")
    try:
        tokens = shlex.split(query, posix=True)
    except ValueError as exc:
        raise GalleryError(f"cannot parse query {query!r}: {exc}") from None
    phrase: List[str] = []
    terms: List[Term] = []
    for tok in tokens:
        sign = 0
        if tok[:1] in "+-" and len(tok) > 1:
            sign, tok = (1 if tok[0] == "+" else -1), tok[1:]
        kind = "text"
        if tok.startswith("img:"):
            kind, tok = "image", tok[4:]
            if not tok:
                raise GalleryError("'img:' must be followed by an image path")
        elif tok.startswith("text:"):
            kind, tok = "ocr", " ".join(tok[5:].split())
            if not tok:
                raise GalleryError("'text:' must be followed by words, e.g. text:\"total 42.50\"")
        if sign == 0 and kind == "text":
            phrase.append(tok)
        else:
            terms.append(Term(sign or 1, kind, tok))
    if phrase:
        terms.insert(0, Term(1, "text", " ".join(phrase)))
    for t in terms:
        if t.kind in ("text", "ocr"):
            try:
                t.value.encode("utf-8")
            except UnicodeEncodeError as exc:  # e.g. argv bytes that are not UTF-8 (surrogateescape)
                raise GalleryError(
                    f"the query's text is not valid UTF-8 (a byte that is not text at character {exc.start + 1}); "
                    "search text must be UTF-8"
                ) from None
    if not any(t.sign > 0 for t in terms):
        raise GalleryError(f"query {query!r} has no positive term")
    return terms
