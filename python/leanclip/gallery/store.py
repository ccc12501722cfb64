"""The gallery's SQLite store: schema, typed rows, and the few statements that read and write them.

Layout (default ``ROOT/.leanclip/``)::

    gallery.db        SQLite (WAL): one row per file (path, size, mtime, inode, ctime, sha256,
                      key, status, reason, capture date) and a ``meta`` table (schema version,
                      model id, dim, generation, dtype, index = exact|ivf|auto, index_kind = the
                      kind of the generation's file: exact or ivf, ocr = 0|1); ``texts`` (FTS5:
                      the text read in each photo, rowid = its key, with ``--ocr``); ``near`` and
                      ``near_done`` (near-duplicate candidate pairs, gallery.duplicates)
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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from leanclip.gallery.errors import GalleryError

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "STORE_DIRNAME",
    "DB_NAME",
    "FileRow",
    "StoreLayout",
    "display",
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
    "hit_rows",
    "has_dates",
    "has_looks",
    "read_looks",
]

SCHEMA_VERSION = 4
# Version 1 lacked files.ino and files.ctime_ns: it is read as is, and the next update() adds
# the columns (its rows then count as changed once: re-hashed, not re-encoded). Version 2 lacked
# the capture dates (files.taken, files.taken_from) and the texts / near / near_done tables:
# read as is (no dates, no text, no duplicates until then), the next update() adds them and
# reads the dates from the files' headers (nothing is re-encoded). Version 3 lacked the looks
# table and near.look (gallery.duplicates): read as is; photos indexed before have no look.
READABLE_VERSIONS = (1, 2, 3, 4)
STORE_DIRNAME = ".leanclip"
DB_NAME = "gallery.db"

# Tables added by version 3 (created by migrate() in older stores). texts: FTS5, rowid = the
# photo's key, the words read in it (an empty body: read, no text; gallery.texts); near: pairs of photos (a < b)
# close in the image-to-image space (gallery.duplicates.worth_storing); near_done: keys whose
# neighbours were searched, with their background score (gallery.duplicates); frames: the
# sampled frames of video clips (key, clip path, time in ms; the clip's row holds the first key).
# Version 4: looks (key, float16 bytes of gallery.duplicates.look) and near.look (the pair's
# look cosine, NULL when a photo has none).
EXTRA_TABLES = """
CREATE VIRTUAL TABLE IF NOT EXISTS texts USING fts5(body, compact, tokenize = 'trigram');
CREATE TABLE IF NOT EXISTS near (
    a INTEGER NOT NULL, b INTEGER NOT NULL, score REAL NOT NULL, look REAL, PRIMARY KEY (a, b)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS near_b ON near (b);
CREATE TABLE IF NOT EXISTS near_done (key INTEGER PRIMARY KEY, background REAL NOT NULL);
CREATE TABLE IF NOT EXISTS frames (key INTEGER PRIMARY KEY, path BLOB NOT NULL, t_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS frames_path ON frames (path);
CREATE TABLE IF NOT EXISTS looks (key INTEGER PRIMARY KEY, look BLOB NOT NULL);
"""

SCHEMA = (
    """
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
    reason TEXT,
    taken INTEGER,                  -- capture time, local wall-clock seconds (leanclip.dates)
    taken_from TEXT                 -- 'exif' or 'mtime'
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
"""
    + EXTRA_TABLES
)


_COLUMNS = "path, size, mtime_ns, sha256, key, status, reason, ino, ctime_ns, taken, taken_from"
_COLUMNS_V2 = "path, size, mtime_ns, sha256, key, status, reason, ino, ctime_ns, NULL, NULL"
_COLUMNS_V1 = "path, size, mtime_ns, sha256, key, status, reason, NULL, NULL, NULL, NULL"


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
    taken: Optional[int] = None  # capture time, wall-clock seconds (leanclip.dates); None: unknown
    taken_from: Optional[str] = None  # "exif" or "mtime"

    @classmethod
    def from_sql(cls, r: Sequence[Any]) -> "FileRow":
        p, size, mtime, sha, key, status, reason, ino, ctime, taken, taken_from = r
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
            None if taken is None else int(taken),
            taken_from,
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


def display(rel: bytes) -> str:
    """A printable form of a stored relative path (non-UTF-8 bytes shown as U+FFFD)."""
    return rel.decode("utf-8", "replace")


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
    if version <= 2:
        conn.execute("ALTER TABLE files ADD COLUMN taken INTEGER")
        conn.execute("ALTER TABLE files ADD COLUMN taken_from TEXT")
        _run_script(conn, EXTRA_TABLES)  # near already has its look column
    elif version == 3:
        conn.execute("ALTER TABLE near ADD COLUMN look REAL")
        _run_script(conn, EXTRA_TABLES)
    set_meta(conn, "schema_version", SCHEMA_VERSION)
    return True


def _columns(conn: sqlite3.Connection) -> str:
    if has_dates(conn):
        return _COLUMNS
    try:
        conn.execute("SELECT ino, ctime_ns FROM files LIMIT 0")
        return _COLUMNS_V2  # a version 2 store, read before its first update by this version
    except sqlite3.OperationalError:
        return _COLUMNS_V1  # a version 1 store, likewise


def has_dates(conn: sqlite3.Connection) -> bool:
    """Does this store have version 3's columns and tables (capture dates, texts, near)?"""
    try:
        conn.execute("SELECT taken FROM files LIMIT 0")
        return True
    except sqlite3.OperationalError:
        return False


def has_looks(conn: sqlite3.Connection) -> bool:
    """Does this store have version 4's looks (gallery.duplicates.look)?"""
    try:
        conn.execute("SELECT look FROM near LIMIT 0")
        return True
    except sqlite3.OperationalError:
        return False


def read_looks(conn: sqlite3.Connection, keys: Sequence[int]) -> Dict[int, Any]:
    """The stored looks of ``keys`` (those that have one), as float16 arrays."""
    out: Dict[int, Any] = {}
    uniq = sorted({int(k) for k in keys})
    for i in range(0, len(uniq), 900):  # SQLite's variable limit
        chunk = uniq[i : i + 900]
        marks = ",".join("?" * len(chunk))
        for k, blob in conn.execute(f"SELECT key, look FROM looks WHERE key IN ({marks})", chunk):
            out[int(k)] = np.frombuffer(blob, dtype=np.float16)
    return out


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for stmt in script.strip().split(";"):
        if stmt.strip():
            conn.execute(stmt)


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the tables of a new store (inside the caller's transaction)."""
    _run_script(conn, SCHEMA)
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
        f"INSERT OR REPLACE INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            row.taken,
            row.taken_from,
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


def hit_rows(
    conn: sqlite3.Connection, keys: Sequence[int]
) -> Dict[int, Tuple[bytes, Optional[int], Optional[int]]]:
    """key -> (path, capture time, time in the clip in ms) of the 'ok' rows and video frames
    holding these keys (the capture time None in a store from before dates, or unknown; the
    clip time None for a photo)."""
    out: Dict[int, Tuple[bytes, Optional[int], Optional[int]]] = {}
    dated = has_dates(conn)
    taken = "taken" if dated else "NULL"
    ks: List[int] = [int(k) for k in keys if 0 <= int(k) < 1 << 63]
    for i in range(0, len(ks), 500):
        chunk = ks[i : i + 500]
        marks = ",".join("?" * len(chunk))
        q = f"SELECT key, path, {taken} FROM files WHERE status='ok' AND key IN ({marks})"
        for k, p, t in conn.execute(q, chunk):
            out[int(k)] = (bytes(p), None if t is None else int(t), None)
        if dated:
            q = (
                "SELECT fr.key, fr.path, f.taken, fr.t_ms FROM frames fr JOIN files f "
                f"ON f.path = fr.path AND f.status = 'ok' WHERE fr.key IN ({marks})"
            )
            for k, p, t, ms in conn.execute(q, chunk):
                out[int(k)] = (bytes(p), None if t is None else int(t), int(ms))
    return out
