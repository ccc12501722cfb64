"""The text read in photos (``--ocr``, :mod:`leanclip.ocr`) and the ``text:`` query terms.

Stored in the FTS5 table ``texts`` (rowid = the photo's key) with the trigram tokenizer, in two
columns: ``body``, the lines as read (shown with the hits), and ``compact``, the same casefolded
with every space removed. Matching uses ``compact``: the recogniser sometimes drops the space
between words ("TOTAL42.50"), so ``text:"total 42.50"`` looks for ``total42.50`` as a substring
(``LIKE``, which the trigram index serves for three characters or more). A term matches
whatever the spacing and case of the photo's text; the words must be in that order.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["MARK_START", "MARK_END", "compact", "store_text", "matching_keys", "highlight", "bodies"]

MARK_START, MARK_END = "\x02", "\x03"  # around the matched words in a hit's text


def compact(text: str) -> str:
    """``text`` casefolded, without any whitespace: what ``text:`` terms are matched against."""
    return "".join(text.casefold().split())


def store_text(conn: sqlite3.Connection, key: int, body: str) -> None:
    conn.execute("DELETE FROM texts WHERE rowid = ?", (int(key),))
    conn.execute("INSERT INTO texts (rowid, body, compact) VALUES (?, ?, ?)", (int(key), body, compact(body)))


def _like(term: str) -> str:
    escaped = compact(term).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _keys(conn: sqlite3.Connection, terms: Sequence[str], join: str) -> Set[int]:
    where = f" {join} ".join("compact LIKE ? ESCAPE '\\'" for _ in terms)
    return {
        int(r) for (r,) in conn.execute(f"SELECT rowid FROM texts WHERE {where}", [_like(t) for t in terms])
    }


def matching_keys(
    conn: sqlite3.Connection, positive: Sequence[str], negative: Sequence[str]
) -> Tuple[Optional[Set[int]], Set[int]]:
    """(keys whose text has every positive term -- None when there is none, keys whose text
    has any negative term)."""
    allowed = _keys(conn, positive, "AND") if positive else None
    banned = _keys(conn, negative, "OR") if negative else set()
    return allowed, banned


def bodies(conn: sqlite3.Connection, keys: Sequence[int]) -> Dict[int, str]:
    ks = [int(k) for k in keys]
    out: Dict[int, str] = {}
    for i in range(0, len(ks), 500):
        chunk = ks[i : i + 500]
        q = f"SELECT rowid, body FROM texts WHERE rowid IN ({','.join('?' * len(chunk))})"
        out.update({int(k): str(b) for k, b in conn.execute(q, chunk)})
    return out


def highlight(body: str, terms: Sequence[str]) -> str:
    """``body`` with each term's first match (any spacing, any case) between MARK_START and
    MARK_END."""
    spans: List[Tuple[int, int]] = []
    for t in terms:
        chars = [re.escape(c) for c in compact(t)]
        if not chars:
            continue
        m = re.search(r"\s*".join(chars), body, flags=re.IGNORECASE)
        if m and not any(a < m.end() and m.start() < b for a, b in spans):
            spans.append((m.start(), m.end()))
    out, last = [], 0
    for a, b in sorted(spans):
        out += [body[last:a], MARK_START, body[a:b], MARK_END]
        last = b
    return "".join(out) + body[last:]
