"""The gallery's SQLite store: schema, typed rows, and the few statements that read and write them.

Layout (default ``ROOT/.leanclip/``)::

    gallery.db        SQLite (WAL): one row per file (path, size, mtime, inode, ctime, sha256,
                      key, status, reason) and a ``meta`` table (schema version, model id, dim,
                      generation, dtype, index = exact|ivf|auto, index_kind = the kind of the
                      generation's file: exact or ivf)
    index-<G>.lci     the Index (or IVFIndex, per index_kind) holding exactly the keys of the
                      rows with status 'ok' at generation G
    lock              held (flock) by the one process running ``update()``
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from leanclip.gallery.errors import GalleryError

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "STORE_DIRNAME",
    "DB_NAME",
    "FileRow",
    "StoreLayout",
    "open_db",
    "open_reader",
    "check_schema",
    "migrate",
    "read_meta",
    "set_meta",
    "init_schema",
    "load_rows",
    "write_row",
    "rows_for_keys",
    "ok_row",
]

SCHEMA_VERSION = 2
# Version 1 lacked files.ino and files.ctime_ns: it is read as is, and the next update() adds
# the columns (its rows then count as changed once: re-hashed, not re-encoded).
READABLE_VERSIONS = (1, 2)
STORE_DIRNAME = ".leanclip"
DB_NAME = "gallery.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,          -- relative to root, os.fsencode'd, '/' separated
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER,                    -- inode number and ctime when indexed: a file swapped for
    ctime_ns INTEGER,               -- another of the same size and mtime is noticed
    sha256 TEXT,
    key INTEGER UNIQUE,             -- vector key in the index, NULL unless status = 'ok'
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'pending')),
    reason TEXT
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
"""

_COLUMNS = "path, size, mtime_ns, sha256, key, status, reason, ino, ctime_ns"
_COLUMNS_V1 = "path, size, mtime_ns, sha256, key, status, reason, NULL, NULL"


@dataclass(frozen=True)
class StoreLayout:
    """Where a gallery keeps what: the photo folder, the store folder, and the file names of
    each generation's index files (see the module docstring)."""

    root: Path  # the photo folder (absolute)
    store: Path  # the store folder (absolute; default ROOT/.leanclip)

    @classmethod
    def of(
        cls, root: "os.PathLike[str] | str", store: "os.PathLike[str] | str | None" = None
    ) -> "StoreLayout":
        r = Path(root).expanduser().absolute()
        return cls(r, Path(store).expanduser().absolute() if store else r / STORE_DIRNAME)

    @property
    def db_path(self) -> Path:
        return self.store / DB_NAME

    @property
    def lock_path(self) -> Path:
        return self.store / "lock"

    def index_path(self, generation: int) -> Path:
        """The joint index of a generation (an Index or IVFIndex, per meta ``index_kind``)."""
        return self.store / f"index-{generation}.lci"

    def similar_path(self, generation: int) -> Path:
        """The image-to-image index of a generation (models with ``has_similarity`` only)."""
        return self.store / f"similar-{generation}.lci"

    def remove_stray_files(self, keep: int) -> None:
        """Remove index files (and temporary files of interrupted saves) of every generation
        but ``keep``: what a killed run leaves behind."""
        keep_names = {self.index_path(keep).name, self.similar_path(keep).name}
        for entry in os.scandir(self.store):
            n = entry.name
            if n.startswith(("index-", ".index-", "similar-", ".similar-", ".tmp")) and n not in keep_names:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


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
    ino: Optional[int] = None  # inode number when indexed (None: a version 1 row)
    ctime_ns: Optional[int] = None  # status change time when indexed

    @classmethod
    def from_sql(cls, r: Sequence[Any]) -> "FileRow":
        p, size, mtime, sha, key, status, reason, ino, ctime = r
        return cls(
            bytes(p),
            int(size),
            int(mtime),
            sha,
            None if key is None else int(key),
            str(status),
            reason,
            None if ino is None else int(ino),
            None if ctime is None else int(ctime),
        )

    def same_file(self, st: os.stat_result) -> bool:
        """Is ``st`` (an ``os.stat`` of the path) still the file this row recorded? Size and
        mtime, and the inode number and ctime where recorded: a file replaced by another (a
        hard link, a rename over it, a copy with the same size and mtime) fails this check."""
        if st.st_size != self.size or st.st_mtime_ns != self.mtime_ns:
            return False
        if self.ino is None or self.ctime_ns is None:
            return True  # a version 1 row: size and mtime are all it recorded
        return st.st_ino == self.ino and st.st_ctime_ns == self.ctime_ns


def open_db(db_path: Path) -> sqlite3.Connection:
    """A writer's connection: autocommit mode (transactions are explicit), WAL, full sync."""
    try:
        conn = sqlite3.connect(
            os.fspath(db_path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.DatabaseError as exc:
        raise GalleryError(f"gallery database {db_path} cannot be opened for writing: {exc}") from None
    return conn


def open_reader(db_path: Path) -> sqlite3.Connection:
    """A reader's connection, opened read-only: reading commands never write the store, so a
    gallery on read-only media (or a store the user may not write) can be searched. When SQLite
    cannot open it so (it needs to create its shared-memory file next to the database, which a
    read-only folder forbids), the database is opened as immutable: on read-only media nothing
    can change it. (A store that its owner writes while another user reads it through this
    fallback may be read mid-change: docs/reliability.md.)"""
    uri = "file:" + urllib.parse.quote(os.fspath(db_path))
    last: Optional[Exception] = None
    for flags in ("?mode=ro", "?mode=ro&immutable=1"):
        try:
            conn = sqlite3.connect(
                uri + flags, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.DatabaseError as exc:
            last = exc
            text = str(exc).lower()
            if not ("unable to open" in text or "readonly" in text or "read-only" in text):
                break  # damaged, busy, not a database: immutable mode would not help
    raise GalleryError(f"gallery database {db_path} cannot be opened: {last}") from None


def check_schema(conn: sqlite3.Connection, db_path: Path) -> None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise GalleryError(f"{db_path} is not a leanclip gallery database ({exc})") from None
    if row is None or int(row[0]) not in READABLE_VERSIONS:
        found = row[0] if row else "none"
        raise GalleryError(
            f"{db_path} has schema version {found}; this leanclip reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )


def migrate(conn: sqlite3.Connection) -> bool:
    """Bring a readable older schema to the current one (inside the writer's transaction).
    Returns True if it changed anything."""
    version = int(read_meta(conn).get("schema_version", SCHEMA_VERSION))
    if version == SCHEMA_VERSION:
        return False
    if version == 1:
        conn.execute("ALTER TABLE files ADD COLUMN ino INTEGER")
        conn.execute("ALTER TABLE files ADD COLUMN ctime_ns INTEGER")
    set_meta(conn, "schema_version", SCHEMA_VERSION)
    return True


def _columns(conn: sqlite3.Connection) -> str:
    try:
        conn.execute("SELECT ino, ctime_ns FROM files LIMIT 0")
        return _COLUMNS
    except sqlite3.OperationalError:
        return _COLUMNS_V1  # a version 1 store, read before its first update by this version


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the tables of a new store (inside the caller's transaction)."""
    for stmt in SCHEMA.strip().split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [
            ("schema_version", str(SCHEMA_VERSION)),
            ("generation", "0"),
            ("next_key", "1"),
            ("model_id", ""),
            ("dim", "0"),
        ],
    )


def read_meta(conn: sqlite3.Connection) -> Dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def set_meta(conn: sqlite3.Connection, key: str, value: object) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))


def load_rows(conn: sqlite3.Connection) -> Dict[bytes, FileRow]:
    """Every row, by path."""
    return {bytes(r[0]): FileRow.from_sql(r) for r in conn.execute(f"SELECT {_columns(conn)} FROM files")}


def write_row(conn: sqlite3.Connection, row: FileRow) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.path,
            row.size,
            row.mtime_ns,
            row.sha256,
            row.key,
            row.status,
            row.reason,
            row.ino,
            row.ctime_ns,
        ),
    )


def ok_row(conn: sqlite3.Connection, rel: bytes) -> Optional[FileRow]:
    """The row of an indexed ('ok') file at ``rel``, else None."""
    r = conn.execute(f"SELECT {_columns(conn)} FROM files WHERE path=? AND status='ok'", (rel,)).fetchone()
    return FileRow.from_sql(r) if r else None


def rows_for_keys(conn: sqlite3.Connection, keys: Sequence[int]) -> Dict[int, bytes]:
    """key -> path of the 'ok' rows holding these keys."""
    out: Dict[int, bytes] = {}
    ks: List[int] = [int(k) for k in keys if 0 <= int(k) < 1 << 63]  # others cannot be SQLite keys
    for i in range(0, len(ks), 500):
        chunk = ks[i : i + 500]
        q = f"SELECT key, path FROM files WHERE status='ok' AND key IN ({','.join('?' * len(chunk))})"
        for k, p in conn.execute(q, chunk):
            out[int(k)] = bytes(p)
    return out
