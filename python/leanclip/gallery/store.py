"""The gallery's SQLite store: schema, typed rows, and the few statements that read and write them.

Layout (default ``ROOT/.leanclip/``)::

    gallery.db        SQLite (WAL): one row per file (path, size, mtime, sha256, key, status,
                      reason) and a ``meta`` table (schema version, model id, dim, generation)
    index-<G>.lci     the Index holding exactly the keys of the rows with status 'ok' at
                      generation G
    lock              held (flock) by the one process running ``update()``
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from leanclip.gallery.errors import GalleryError

__all__ = ["SCHEMA", "SCHEMA_VERSION", "STORE_DIRNAME", "DB_NAME", "FileRow", "open_db", "check_schema",
           "read_meta", "init_schema", "load_rows", "write_row", "rows_for_keys", "ok_row"]

SCHEMA_VERSION = 1
STORE_DIRNAME = ".leanclip"
DB_NAME = "gallery.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,          -- relative to root, os.fsencode'd, '/' separated
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    key INTEGER UNIQUE,             -- vector key in the index, NULL unless status = 'ok'
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'pending')),
    reason TEXT
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
"""

_COLUMNS = "path, size, mtime_ns, sha256, key, status, reason"


@dataclass
class FileRow:
    """One row of the ``files`` table."""

    path: bytes  # relative to the root, os.fsencode'd, '/' separated
    size: int
    mtime_ns: int
    sha256: Optional[str]
    key: Optional[int]  # the vector's key in the index; None unless status == "ok"
    status: str  # "ok", "failed" or "pending"
    reason: Optional[str] = None  # why it failed

    @classmethod
    def from_sql(cls, r: Sequence[object]) -> "FileRow":
        p, size, mtime, sha, key, status, reason = r
        return cls(bytes(p), int(size), int(mtime), sha, None if key is None else int(key),  # type: ignore[arg-type,call-overload]
                   str(status), reason)  # type: ignore[arg-type]


def open_db(db_path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, full sync."""
    try:
        conn = sqlite3.connect(os.fspath(db_path), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.DatabaseError as exc:
        raise GalleryError(f"gallery database {db_path} cannot be opened: {exc}") from None
    return conn


def check_schema(conn: sqlite3.Connection, db_path: Path) -> None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise GalleryError(f"{db_path} is not a leanclip gallery database ({exc})") from None
    if row is None or int(row[0]) != SCHEMA_VERSION:
        found = row[0] if row else "none"
        raise GalleryError(f"{db_path} has schema version {found}; this leanclip reads version {SCHEMA_VERSION}")


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the tables of a new store (inside the caller's transaction)."""
    for stmt in SCHEMA.strip().split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("schema_version", str(SCHEMA_VERSION)), ("generation", "0"), ("next_key", "1"),
         ("model_id", ""), ("dim", "0")],
    )


def read_meta(conn: sqlite3.Connection) -> Dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))


def load_rows(conn: sqlite3.Connection) -> Dict[bytes, FileRow]:
    """Every row, by path."""
    return {bytes(r[0]): FileRow.from_sql(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM files")}


def write_row(conn: sqlite3.Connection, row: FileRow) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (row.path, row.size, row.mtime_ns, row.sha256, row.key, row.status, row.reason),
    )


def ok_row(conn: sqlite3.Connection, rel: bytes) -> Optional[FileRow]:
    """The row of an indexed ('ok') file at ``rel``, else None."""
    r = conn.execute(f"SELECT {_COLUMNS} FROM files WHERE path=? AND status='ok'", (rel,)).fetchone()
    return FileRow.from_sql(r) if r else None


def rows_for_keys(conn: sqlite3.Connection, keys: Sequence[int]) -> Dict[int, bytes]:
    """key -> path of the 'ok' rows holding these keys."""
    out: Dict[int, bytes] = {}
    ks: List[int] = [int(k) for k in keys]
    for i in range(0, len(ks), 500):
        chunk = ks[i : i + 500]
        q = f"SELECT key, path FROM files WHERE status='ok' AND key IN ({','.join('?' * len(chunk))})"
        for k, p in conn.execute(q, chunk):
            out[int(k)] = bytes(p)
    return out
