"""``Gallery.update()``: bring the store in step with the folder.

Commit protocol (crash consistency). The database's ``generation`` names the one index file
that matches its rows. A checkpoint saves the in-memory index as a *new* file
``index-<G+1>.lci`` (atomically; for a model with image-to-image vectors their exact index
``similar-<G+1>.lci`` is saved first, same keys), then commits the rows together with
``generation = G+1`` in one SQLite transaction, and only then deletes the generation-G files. A kill before the commit leaves
the old rows and the old index (both still on disk) in force; a kill after it leaves the new
pair. Stray index files are removed by the next ``update()``. Keys are never reused, so a reader
holding an older index never maps a key to the wrong file.

A run: scan the folder (symlinks are not followed; a folder that cannot be listed keeps its
rows and is reported), compare each file's size, mtime, inode and ctime with its row (a file
swapped for another of the same size and mtime is noticed by its inode or ctime), hash the changed and
new ones, recognise renames and copies by content, drop the rows of deleted files, and encode
the rest in batches, checkpointing as it goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from leanclip.bundle import BundleError, sha256_file
from leanclip.dates import capture_time
from leanclip.gallery import duplicates, kinds, texts
from leanclip.gallery import store as db
from leanclip.gallery.errors import GalleryBusyError, GalleryError
from leanclip.gallery.store import FileRow, StoreLayout
from leanclip.images import DEFAULT_MAX_PIXELS, PHONE_EXTENSIONS, ImageLoadError, load_image
from leanclip.video import VIDEO_EXTENSIONS

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} | PHONE_EXTENSIONS
)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stage is "scan", "hash", "encode", "dates", "text" or
"duplicates"."""


@dataclass(frozen=True)
class UpdateOptions:
    """How an update run encodes, stores and checkpoints (``Gallery``'s keywords)."""

    dtype: Optional[str] = None  # vector storage precision; None keeps the store's (new: f32)
    index_kind: Optional[str] = None  # exact | ivf | auto; None keeps the store's (new: auto)
    recall: Optional[float] = None  # an IVF index's target recall@10; None keeps the store's (new: 0.95)
    auto_threshold: int = kinds.AUTO_IVF_THRESHOLD  # "auto" is IVF above this many photos
    # an IVF index trains itself (its layout chosen) once it holds this many vectors; None:
    # IVFIndex's own threshold (65,536)
    ivf_train_at: Optional[int] = None
    batch_size: int = 32  # images per encoder call
    checkpoint_every: int = 512  # files between checkpoints, at most ...
    checkpoint_seconds: float = 30.0  # ... or seconds between them
    # a checkpoint rewrites the whole index file: they are spaced so that saving takes at
    # most this fraction of the run (1.0: no spacing beyond checkpoint_every / _seconds)
    checkpoint_overhead: float = 0.1
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused before decoding
    model_source: str = ""  # the model's bundle path, recorded so later runs reuse it
    ocr: Optional[bool] = None  # read the text in photos (leanclip.ocr); None keeps the store's
    video: Optional[bool] = None  # index video clips (leanclip.video); None keeps the store's
    video_interval: float = 2.0  # seconds between a clip's sampled frames


@dataclass
class UpdateSummary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    renamed: int = 0
    copied: int = 0  # new files whose content was already indexed: vector reused, not encoded
    unchanged: int = 0
    failed: int = 0  # files that failed in this run
    encoded: int = 0
    texts: int = 0  # photos whose text was read in this run (--ocr)
    frames: int = 0  # video frames encoded in this run (--video)
    total_ok: int = 0
    seconds: float = 0.0
    model_id: str = ""
    index: str = ""  # the kind of the index after the run: "exact" or "ivf" (gallery.kinds)
    recovered: str = ""  # what was repaired at the start, if anything
    failures: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)
    # folders that could not be listed ("." is the root): (name, reason); their rows were kept
    unreadable: List[Tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["failures"] = [{"name": n, "reason": r} for n, r in self.failures]
        out["unreadable"] = [{"name": n, "reason": r} for n, r in self.unreadable]
        return out


@dataclass
class FoundFile:
    """A regular image file found by the scan."""

    rel: bytes
    abspath: str
    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int

    def unchanged_since(self, row: FileRow) -> bool:
        """The cheap check: same size, mtime, inode and ctime as the row recorded (a row of
        schema version 1, without inode and ctime, never passes: it is re-hashed once)."""
        return (row.size, row.mtime_ns, row.ino, row.ctime_ns) == (
            self.size,
            self.mtime_ns,
            self.ino,
            self.ctime_ns,
        )

    def ok_row(self, digest: str, key: int) -> FileRow:
        """The row of this file encoded under ``key``, with its capture time read now."""
        when = capture_time(self.abspath)
        return FileRow(
            self.rel,
            self.size,
            self.mtime_ns,
            digest,
            key,
            "ok",
            None,
            self.ino,
            self.ctime_ns,
            when.wall,
            when.source,
        )


@dataclass
class ScanResult:
    found: List[FoundFile]
    bad: List[Tuple[bytes, str]]  # entries named like images that cannot be one, with the reason
    unreadable: List[Tuple[bytes, str]]  # folders that could not be listed ("." is the root), reason


@dataclass
class UpdateState:
    """The state of one update run: the open write transaction and the in-memory index."""

    conn: sqlite3.Connection
    index: Any  # leanclip.Index or leanclip.IVFIndex (gallery.kinds)
    gen: int  # generation of the last committed index file
    next_key: int  # keys are never reused
    dirty: bool  # rows or index changed since the last checkpoint
    clean: bool = False  # an interrupt now loses nothing already applied (between batches)
    last_checkpoint: float = 0.0  # time.monotonic() of the last checkpoint
    since_checkpoint: int = 0  # files processed since then
    last_save_s: float = 0.0  # how long the last index save took
    dtype: str = "f32"  # the storage precision asked for
    index_choice: str = "auto"  # "exact", "ivf" or "auto" (gallery.kinds)
    recall: float = kinds.DEFAULT_RECALL  # an IVF index is tuned to it (kinds.keep_recall)
    # the image-to-image vectors of a model that has them (``Encoder.has_similarity``): an exact
    # leanclip.Index with the same keys as ``index``, whatever kind that is; None otherwise
    similar: Any = None


def _describe(exc: BaseException) -> str:
    """A non-empty reason from an exception (MemoryError() and others have an empty message)."""
    text = str(exc).strip()
    if isinstance(exc, MemoryError):
        return f"out of memory ({text})" if text else "out of memory"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_video(rel: bytes) -> bool:
    return os.path.splitext(rel)[1].lower().decode("ascii", "replace") in VIDEO_EXTENSIONS


def display(rel: bytes) -> str:
    """A printable form of a stored relative path (non-UTF-8 bytes shown as U+FFFD)."""
    return rel.decode("utf-8", "replace")


def similarity_dim(enc: Any) -> int:
    """The width of a model's image-to-image vectors; 0 when it has none."""
    if not getattr(enc, "has_similarity", False):
        return 0
    return int(getattr(enc, "similarity_dim", 0) or 0)


def model_image_size(enc: Any) -> int:
    try:
        return int(enc.manifest.image.size)
    except AttributeError:
        return int(getattr(enc, "image_size", 224))


def acquire_writer(store: Any) -> int:
    """Take the store's writer lock (flock, non-blocking); returns its fd."""
    try:
        store.mkdir(parents=True, exist_ok=True)
        fd = os.open(store / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        what = (
            "is a directory, not a lock file"
            if isinstance(exc, IsADirectoryError)
            else (exc.strerror or str(exc))
        )
        raise GalleryError(
            f"cannot update the gallery: its store {store} cannot be written ({exc.filename or store}: {what})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GalleryBusyError(f"another process is updating the gallery in {store}") from None
    return fd


def scan(
    root: str, store: str, progress: Optional[Progress], extensions: "frozenset[str]" = IMAGE_EXTENSIONS
) -> ScanResult:
    """Regular image files under root (symlinks are not followed), and entries that look like
    images but cannot be one (directories, devices) with the reason."""
    found: List[FoundFile] = []
    bad: List[Tuple[bytes, str]] = []
    unreadable: List[Tuple[bytes, str]] = []
    store_real = os.path.realpath(store)

    def onerror(exc: OSError) -> None:
        # a folder that cannot be listed: its files stay as they were recorded, nothing is
        # deleted. A subfolder that vanished since its parent was listed is simply gone.
        where = os.fspath(exc.filename) if exc.filename is not None else root
        if isinstance(exc, FileNotFoundError) and os.path.realpath(where) != os.path.realpath(root):
            return
        rel = os.path.relpath(where, root).replace(os.sep, "/")
        unreadable.append((os.fsencode(rel), exc.strerror or type(exc).__name__))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if d.startswith(".") or os.path.islink(full) or os.path.realpath(full) == store_real:
                continue  # hidden folders, the store, and symlinked folders are skipped
            if os.path.splitext(d)[1].lower() in extensions:
                rel = os.fsencode(os.path.relpath(full, root).replace(os.sep, "/"))
                bad.append((rel, "is a directory, not an image file"))
            keep.append(d)
        dirnames[:] = sorted(keep)
        for f in sorted(filenames):
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in extensions:
                continue
            full = os.path.join(dirpath, f)
            rel = os.fsencode(os.path.relpath(full, root).replace(os.sep, "/"))
            try:
                st = os.lstat(full)
            except OSError as exc:
                bad.append((rel, f"cannot stat: {exc.strerror}"))
                continue
            if stat.S_ISLNK(st.st_mode):
                continue  # symlinks are never followed (loops, files outside the root)
            if not stat.S_ISREG(st.st_mode):
                bad.append((rel, "not a regular file"))
                continue
            found.append(FoundFile(rel, full, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
        if progress:
            progress("scan", len(found), 0)
    return ScanResult(found, bad, unreadable)


@dataclass
class _Previous:
    """What an update keeps of the store's last generation, or why it encodes all again."""

    index: Any
    similar: Any  # the image-to-image index (None when the model has none)
    reset_reason: str  # empty when the encodings are kept
    model_changed: bool
    dtype: str  # the vectors' precision from now on


@dataclass
class _Settings:
    """The store's settings as this update records them."""

    index_choice: str
    recall: float
    ocr: bool
    video: bool
    sim_changed: bool  # the image-to-image index's dimension changed


def _previous(layout: StoreLayout, meta: Dict[str, str], enc: Any, options: UpdateOptions) -> _Previous:
    """The last generation's indexes if this update can go on from them, else why not."""
    from leanclip import Index, IndexFileError

    gen = int(meta["generation"])
    index: Any = None
    reset_reason = ""
    model_changed = bool(meta.get("model_id")) and meta["model_id"] != enc.model_id
    if model_changed:
        reset_reason = f"model changed from {meta['model_id']} to {enc.model_id}: re-encoding all files"
    elif gen > 0:
        try:
            index = kinds.load_index(layout.index_path(gen), meta.get("index_kind", "exact"))
            if index.dim != enc.dim:
                reset_reason = f"index dim {index.dim} != model dim {enc.dim}: re-encoding"
                index = None
        except (FileNotFoundError, IndexFileError, OSError, ValueError) as exc:
            reset_reason = f"index file for generation {gen} unusable ({exc}); re-encoding"
    want_dtype = options.dtype or meta.get("dtype") or "f32"
    stored_dtype, finer = meta.get("dtype") or "f32", ("i8", "f16", "f32")
    if index is not None and not reset_reason and stored_dtype in finer and want_dtype in finer:
        if finer.index(want_dtype) > finer.index(stored_dtype):
            # i8 or f16 vectors cannot give back what a finer precision keeps: encode again
            reset_reason = f"precision raised from {stored_dtype} to {want_dtype}: re-encoding all files"
            index = None
    sim_dim = similarity_dim(enc)
    similar: Any = None
    if sim_dim:
        if index is not None and not reset_reason:
            similar = load_similar(layout, gen, meta, sim_dim, len(index))
            if similar is None and len(index):
                reset_reason = "no usable image-to-image index for this model: re-encoding"
                index = None
        if similar is None:
            similar = Index(sim_dim, dtype=want_dtype)  # type: ignore[arg-type]
    if index is None:
        index = Index(enc.dim, dtype=want_dtype)  # type: ignore[arg-type]
    return _Previous(index, similar, reset_reason, model_changed, want_dtype)


def _forget_encodings(conn: sqlite3.Connection, model_changed: bool) -> None:
    """Marks every encoded file pending again and drops what was derived from the old keys."""
    # a new model also retries the files the old one failed: the failure may have been its own
    retry = "('ok', 'failed')" if model_changed else "('ok')"
    conn.execute(f"UPDATE files SET status='pending', key=NULL WHERE status IN {retry}")
    for table in ("near", "near_done", "texts"):  # all keyed by the keys just dropped
        conn.execute(f"DELETE FROM {table}")


def _record_settings(
    conn: sqlite3.Connection, meta: Dict[str, str], enc: Any, options: UpdateOptions, prev: _Previous
) -> _Settings:
    """Writes this update's settings (the options given, else the store's) to the meta table."""
    # the index kind asked for (kept across updates); conversions happen after the scan
    choice = options.index_kind or meta.get("index") or "auto"
    sim_dim = similarity_dim(enc)
    db.set_meta(conn, "model_id", enc.model_id)
    db.set_meta(conn, "dim", enc.dim)
    db.set_meta(conn, "dtype", prev.dtype)
    db.set_meta(conn, "model_source", options.model_source)
    db.set_meta(conn, "index", choice)
    recall = options.recall if options.recall is not None else float(meta.get("recall", kinds.DEFAULT_RECALL))
    db.set_meta(conn, "recall", recall)
    ocr = options.ocr if options.ocr is not None else meta.get("ocr") == "1"
    db.set_meta(conn, "ocr", int(ocr))
    video = options.video if options.video is not None else meta.get("video") == "1"
    db.set_meta(conn, "video", int(video))
    if video:
        from leanclip._deps import require

        require("av", "video", "indexing video clips (--video)")  # before any work
    db.set_meta(conn, "index_kind", kinds.kind_of(prev.index))
    # committed with the generation: readers open similar-<G>.lci only when it is nonzero
    sim_changed = meta.get("similarity_dim", "0") != str(sim_dim)
    db.set_meta(conn, "similarity_dim", sim_dim)
    return _Settings(choice, recall, ocr, video, sim_changed)


def _roll_back(conn: Optional[sqlite3.Connection], run: Optional["Sync"], exc: BaseException) -> None:
    """Ends the open transaction of an update that failed with ``exc``: an interrupt between
    batches keeps the finished work (a last checkpoint), anything else rolls back."""
    if conn is None or not conn.in_transaction:
        return
    if run is not None and run.state.clean and isinstance(exc, KeyboardInterrupt):
        # interrupted between batches: keep the finished work, then stop
        try:
            run.checkpoint()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    else:
        conn.execute("ROLLBACK")


def run_update(
    layout: StoreLayout, enc: Any, options: UpdateOptions, progress: Optional[Progress] = None
) -> UpdateSummary:
    """Bring the store at ``layout`` in step with its folder, encoding with ``enc`` (see the
    module docstring); the body of ``Gallery.update()``."""
    t0 = time.perf_counter()
    summary = UpdateSummary(model_id=enc.model_id)
    lock_fd = acquire_writer(layout.store)
    conn: Optional[sqlite3.Connection] = None
    run: Optional[Sync] = None
    try:
        conn = db.open_db(layout.db_path)
        conn.execute("BEGIN IMMEDIATE")
        # A database without any table is ours, killed before its schema was committed
        # (connect() creates the file first): start it afresh rather than refuse it.
        fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if fresh:
            db.init_schema(conn)
        db.check_schema(conn, layout.db_path)
        migrated = db.migrate(conn)
        meta = db.read_meta(conn)
        gen = int(meta["generation"])
        prev = _previous(layout, meta, enc, options)
        if prev.reset_reason:
            _forget_encodings(conn, prev.model_changed)
            summary.recovered = prev.reset_reason
        settings = _record_settings(conn, meta, enc, options, prev)
        layout.remove_stray_files(keep=gen)
        state = UpdateState(
            conn=conn,
            index=prev.index,
            gen=gen,
            next_key=int(meta["next_key"]),
            dirty=bool(prev.reset_reason or fresh or migrated or settings.sim_changed),
            dtype=prev.dtype,
            index_choice=settings.index_choice,
            recall=settings.recall,
            similar=prev.similar,
        )
        run = Sync(layout, enc, options, state, summary, progress)
        run.video = settings.video
        if settings.ocr:
            from leanclip.ocr import TextReader

            run.text_reader = TextReader()  # a missing extra fails here, before any work
        run.run()
        run.finish()
        run.checkpoint()
        conn.execute("COMMIT")
        summary.total_ok = int(conn.execute("SELECT COUNT(*) FROM files WHERE status='ok'").fetchone()[0])
        summary.index = kinds.kind_of(run.state.index)
    except sqlite3.Error as exc:
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise GalleryError(f"cannot update the gallery database {layout.db_path}: {exc}") from None
    except BaseException as exc:
        _roll_back(conn, run, exc)
        raise
    finally:
        if conn is not None:
            conn.close()
        os.close(lock_fd)
    summary.seconds = time.perf_counter() - t0
    return summary


def load_similar(layout: StoreLayout, gen: int, meta: Dict[str, str], sim_dim: int, n: int) -> Any:
    """The committed image-to-image index of generation ``gen`` when it fits a model with
    ``sim_dim``-wide vectors and an index of ``n`` vectors; None when there is none to reuse."""
    from leanclip import Index, IndexFileError

    if gen == 0 or meta.get("similarity_dim") != str(sim_dim):
        return None
    try:
        similar = Index.load(os.fspath(layout.similar_path(gen)))
    except (FileNotFoundError, IndexFileError, OSError, ValueError):
        return None
    return similar if similar.dim == sim_dim and len(similar) == n else None


class Sync:
    """One update run over an open write transaction (``UpdateState``)."""

    def __init__(
        self,
        layout: StoreLayout,
        encoder: Any,
        options: UpdateOptions,
        state: UpdateState,
        summary: UpdateSummary,
        progress: Optional[Progress],
    ) -> None:
        self.layout = layout
        self.encoder = encoder
        self.options = options
        self.state = state
        self.summary = summary
        self.progress = progress
        self.rows: Dict[bytes, FileRow] = {}
        self.text_reader: Any = None  # leanclip.ocr.TextReader when the gallery reads text
        self.video = False  # video clips are indexed too

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save the index as a new generation, commit the rows with it, drop the old file.
        Leaves a new write transaction open."""
        s = self.state
        if not s.dirty:
            return
        old, new = s.gen, s.gen + 1
        t0 = time.monotonic()
        if s.similar is not None:
            s.similar.save(os.fspath(self.layout.similar_path(new)))
        s.index.save(os.fspath(self.layout.index_path(new)))
        s.last_save_s = time.monotonic() - t0
        db.set_meta(s.conn, "generation", new)
        db.set_meta(s.conn, "next_key", s.next_key)
        s.conn.execute("COMMIT")
        s.gen, s.dirty = new, False
        s.last_checkpoint = time.monotonic()
        s.since_checkpoint = 0
        # index-<G> first: a reader that finds similar-<G> gone knows its generation is stale
        for path in (self.layout.index_path(old), self.layout.similar_path(old)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        s.conn.execute("BEGIN IMMEDIATE")

    def checkpoint_if_due(self, force: bool = False) -> None:
        s = self.state
        elapsed = time.monotonic() - s.last_checkpoint
        min_gap = s.last_save_s * (1.0 / self.options.checkpoint_overhead - 1.0)
        due = (
            force
            or elapsed >= min_gap
            and (
                s.since_checkpoint >= self.options.checkpoint_every
                or elapsed >= self.options.checkpoint_seconds
            )
        )
        if due:
            self.checkpoint()

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        s = self.state
        s.last_checkpoint = time.monotonic()
        s.since_checkpoint = 0
        extensions = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if self.video else IMAGE_EXTENSIONS
        scanned = scan(os.fspath(self.layout.root), os.fspath(self.layout.store), self.progress, extensions)
        # the gallery's size after this run; a folder that cannot be listed keeps its rows
        n = len(scanned.found) if not scanned.unreadable else max(len(scanned.found), len(s.index))
        self.convert_index(n)
        self.rows = db.load_rows(s.conn)
        self.record_bad(scanned.bad)
        to_hash, missing = self.classify(scanned)
        to_encode = self.hash_changed(to_hash, missing)
        self.remove_missing(missing)
        remaining = self.copy_duplicates(to_encode)
        self.checkpoint_if_due(force=True)
        self.encode_all([item for item in remaining if not is_video(item[0].rel)])
        self.encode_videos([item for item in remaining if is_video(item[0].rel)])
        self.fill_dates()
        self.update_near()
        self.read_texts()

    def record_bad(self, bad: List[Tuple[bytes, str]]) -> None:
        """Entries that look like images but are not files: recorded as failed."""
        s, summary = self.state, self.summary
        for rel, reason in bad:
            old = self.rows.get(rel)
            if old and old.status == "failed":
                summary.unchanged += 1
                continue
            if old and old.key is not None:
                self.remove_keys([old.key])
            db.write_row(s.conn, FileRow(rel, 0, 0, None, None, "failed", reason))
            summary.failed += 1
            summary.failures.append((display(rel), reason))
            s.dirty = True

    def classify(self, scanned: ScanResult) -> Tuple[List[FoundFile], Dict[bytes, FileRow]]:
        """The found files to hash (new or changed), and the rows whose file is missing."""
        rows, summary = self.rows, self.summary
        to_hash: List[FoundFile] = []
        for f in scanned.found:
            old = rows.get(f.rel)
            if old and f.unchanged_since(old) and old.status != "pending":
                summary.unchanged += 1
            else:
                to_hash.append(f)
        # rows under a folder that could not be listed are kept (the root: all of them)
        for rel, reason in scanned.unreadable:
            summary.unreadable.append((display(rel), reason))
        seen = {f.rel for f in scanned.found}
        bad_names = {rel for rel, _ in scanned.bad}
        kept_under = tuple(rel + b"/" for rel, _ in scanned.unreadable)
        keep_all = any(rel == b"." for rel, _ in scanned.unreadable)
        missing = {
            rel: r
            for rel, r in rows.items()
            if rel not in seen
            and rel not in bad_names
            and not keep_all
            and not (kept_under and rel.startswith(kept_under))
        }
        return to_hash, missing

    def hash_changed(
        self, to_hash: List[FoundFile], missing: Dict[bytes, FileRow]
    ) -> List[Tuple[FoundFile, str]]:
        """Hashes ``to_hash``: a file with its old content keeps its row, one with the content
        of a missing row is that file renamed (its row moves; taken out of ``missing``); the
        rest, with their digests, are to encode."""
        s, summary, conn, progress, rows = self.state, self.summary, self.state.conn, self.progress, self.rows
        # content of vanished ok rows, for rename detection
        vanished_by_hash: Dict[str, List[bytes]] = {}
        for rel, r in missing.items():
            if r.status == "ok" and r.sha256:
                vanished_by_hash.setdefault(r.sha256, []).append(rel)
        to_encode: List[Tuple[FoundFile, str]] = []
        for i, f in enumerate(to_hash):
            if progress:
                progress("hash", i, len(to_hash))
            try:
                digest = sha256_file(f.abspath)
            except OSError as exc:
                self.record_failure(f, None, f"cannot read: {exc.strerror or exc}")
                continue
            old = rows.get(f.rel)
            if old is not None:
                if old.sha256 == digest and old.status == "ok":
                    # same content, new mtime (touched / copied back): nothing to encode
                    when = capture_time(f.abspath)
                    conn.execute(
                        "UPDATE files SET size=?, mtime_ns=?, ino=?, ctime_ns=?, taken=?, taken_from=? WHERE path=?",
                        (f.size, f.mtime_ns, f.ino, f.ctime_ns, when.wall, when.source, f.rel),
                    )
                    summary.unchanged += 1
                    s.dirty = True
                else:
                    to_encode.append((f, digest))
                continue
            moved_from = vanished_by_hash.get(digest)
            if moved_from:
                src = moved_from.pop()
                del missing[src]
                conn.execute(
                    "UPDATE files SET path=?, size=?, mtime_ns=?, ino=?, ctime_ns=? WHERE path=?",
                    (f.rel, f.size, f.mtime_ns, f.ino, f.ctime_ns, src),
                )
                conn.execute("UPDATE frames SET path=? WHERE path=?", (f.rel, src))  # a clip's frames
                summary.renamed += 1
                s.dirty = True
                continue
            to_encode.append((f, digest))
        if progress and to_hash:
            progress("hash", len(to_hash), len(to_hash))
        return to_encode

    def remove_missing(self, missing: Dict[bytes, FileRow]) -> None:
        """Deleted files leave the index and the database."""
        if not missing:
            return
        gone = [r.key for r in missing.values() if r.key is not None]
        if gone:
            self.remove_keys(gone)
        self.state.conn.executemany("DELETE FROM files WHERE path=?", [(rel,) for rel in missing])
        self.summary.removed += len(missing)
        self.state.dirty = True

    def copy_duplicates(self, to_encode: List[Tuple[FoundFile, str]]) -> List[Tuple[FoundFile, str]]:
        """Duplicates of already indexed content reuse the stored vector (and look); returns
        the files still to encode."""
        s, conn, index = self.state, self.state.conn, self.state.index
        remaining: List[Tuple[FoundFile, str]] = []
        for f, digest in to_encode:
            dup = conn.execute(
                "SELECT key FROM files WHERE sha256=? AND status='ok' AND path<>? LIMIT 1", (digest, f.rel)
            ).fetchone()
            if dup is not None and int(dup[0]) in index and not is_video(f.rel):
                vec = index.get([int(dup[0])])
                sim = s.similar.get([int(dup[0])]) if s.similar is not None else None
                self.store_vectors([(f, digest)], vec, sim)
                self.summary.copied += 1
                got = db.read_looks(conn, [int(dup[0])]).get(int(dup[0]))
                if got is not None:
                    self.store_looks([(self.rows[f.rel], got)])
            else:
                remaining.append((f, digest))
        return remaining

    def read_texts(self) -> None:
        """The text in every indexed photo not read yet (with ``--ocr``), checkpointed as it
        goes like encoding: a kill loses at most the photos since the last checkpoint."""
        s, progress, reader = self.state, self.progress, self.text_reader
        if reader is None:
            return
        todo = s.conn.execute(
            "SELECT key, path FROM files WHERE status='ok' AND key NOT IN (SELECT rowid FROM texts) "
            "AND key NOT IN (SELECT key FROM frames)"
        ).fetchall()
        root = os.fsencode(self.layout.root)
        if progress:
            progress("text", 0, len(todo))
        for i, (key, rel) in enumerate(todo):
            s.clean = True
            try:
                text = reader.read(os.fsdecode(os.path.join(root, bytes(rel))), self.options.max_pixels)
            except ImageLoadError:
                text = ""  # changed since it was encoded: the next run re-encodes and reads it
            s.clean = False
            texts.store_text(s.conn, int(key), text)
            self.summary.texts += 1
            s.dirty = True
            s.since_checkpoint += 1
            if progress:
                progress("text", i + 1, len(todo))
            self.checkpoint_if_due()
        s.clean = False

    def fill_dates(self) -> None:
        """Capture dates of indexed photos that have none (a store from before dates existed):
        read from the files' headers, nothing re-encoded."""
        s, progress = self.state, self.progress
        todo = [
            bytes(p) for (p,) in s.conn.execute("SELECT path FROM files WHERE status='ok' AND taken IS NULL")
        ]
        root = os.fsencode(self.layout.root)
        for i, rel in enumerate(todo):
            when = capture_time(os.fsdecode(os.path.join(root, rel)))
            s.conn.execute(
                "UPDATE files SET taken=?, taken_from=? WHERE path=?", (when.wall, when.source, rel)
            )
            s.dirty = True
            if progress and i % 256 == 0:
                progress("dates", i, len(todo))

    def update_near(self) -> None:
        """Near-duplicate pairs of the photos added since the last run (gallery.duplicates):
        the pairs of removed photos go, the new photos' neighbours are searched once."""
        s, conn = self.state, self.state.conn
        live = "SELECT key FROM files WHERE status='ok' AND key IS NOT NULL"
        conn.execute(f"DELETE FROM near_done WHERE key NOT IN ({live})")
        conn.execute(f"DELETE FROM near WHERE a NOT IN ({live}) OR b NOT IN ({live})")
        space = s.similar if s.similar is not None else s.index
        done = {int(k) for (k,) in conn.execute("SELECT key FROM near_done")}
        clips = {int(k) for (k,) in conn.execute("SELECT key FROM frames")}  # frames: not photos
        pending = [int(k) for (k,) in conn.execute(live) if int(k) not in done and int(k) not in clips]
        if not pending:
            return
        if self.progress:
            self.progress("duplicates", 0, len(pending))
        pairs = duplicates.neighbour_pairs(space, pending, floor=duplicates.LOOK_FLOOR)
        looks = db.read_looks(conn, np.concatenate([pairs.a, pairs.b]).tolist())
        look = duplicates.look_scores(pairs.a, pairs.b, looks)
        keep = duplicates.worth_storing(pairs.score, look)
        conn.executemany(
            "INSERT OR REPLACE INTO near (a, b, score, look) VALUES (?, ?, ?, ?)",
            [
                (a, b, sc, None if t != t else t)  # NaN (no look): NULL
                for a, b, sc, t in zip(
                    pairs.a[keep].tolist(),
                    pairs.b[keep].tolist(),
                    pairs.score[keep].tolist(),
                    look[keep].tolist(),
                )
                if a not in clips and b not in clips
            ],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO near_done (key, background) VALUES (?, ?)", pairs.background.items()
        )
        s.dirty = True
        if self.progress:
            self.progress("duplicates", len(pending), len(pending))

    def store_looks(self, rows: List[Tuple[Any, np.ndarray]]) -> None:
        """The looks (gallery.duplicates.look) of photos just stored, by their rows' keys."""
        self.state.conn.executemany(
            "INSERT OR REPLACE INTO looks (key, look) VALUES (?, ?)",
            [
                (row.key, lk.astype(np.float16).tobytes())
                for row, lk in rows
                if row.status == "ok" and row.key
            ],
        )

    def convert_index(self, n: int) -> None:
        """Give the index the kind and precision a gallery of about ``n`` photos should have
        (gallery.kinds; an IVF index from before the automatic layout gets it), moving its
        stored vectors across: nothing is re-encoded. The converted index is saved as the next
        generation with its kind in the same commit."""
        s = self.state
        meta = db.read_meta(s.conn)
        current = kinds.kind_of(s.index)
        kind = kinds.want_kind(s.index_choice, current, n, self.options.auto_threshold)
        auto_layout = meta.get("ivf_layout") == kinds.AUTO_LAYOUT
        new = kinds.convert(s.index, kind, s.dtype, auto_layout, self.options.ivf_train_at)
        if new is not s.index:
            s.index = new
            db.set_meta(s.conn, "index_kind", kinds.kind_of(new))
            db.set_meta(s.conn, "ivf_layout", kinds.AUTO_LAYOUT if kind == "ivf" else "")
            # a new index: trained on everything (or not yet), never tuned
            db.set_meta(s.conn, "ivf_trained_at", len(new) if kind == "ivf" and new.is_trained else 0)
            db.set_meta(s.conn, "ivf_tuned_at", 0)
            s.dirty = True
        if s.similar is not None and s.similar.dtype != s.dtype:  # always exact: only the precision
            s.similar = s.similar.astype(s.dtype)
            s.dirty = True

    def finish(self) -> None:
        """Keep an IVF index's layout and recall: retrain it when it trained itself during the
        run (on the vectors that came first, in path order) or its size doubled or halved since
        it was trained (kinds.keep_layout), and tune it to the gallery's recall when it is not
        tuned to it or drifted (kinds.keep_recall; always after a retrain)."""
        s = self.state
        ix = s.index
        meta = db.read_meta(s.conn)
        tuned_at = int(meta.get("ivf_tuned_at") or 0) or None
        trained_at = kinds.keep_layout(ix, int(meta.get("ivf_trained_at") or 0) or None)
        if trained_at is not None:
            db.set_meta(s.conn, "ivf_trained_at", trained_at)
            s.dirty, tuned_at = True, None
        tuned_at = kinds.keep_recall(ix, s.recall, tuned_at)
        if tuned_at is not None:
            db.set_meta(s.conn, "ivf_tuned_at", tuned_at)
            s.dirty = True

    def encode_all(self, remaining: List[Tuple[FoundFile, str]]) -> None:
        s, progress = self.state, self.progress
        size = model_image_size(self.encoder)
        total = len(remaining)
        if progress:
            progress("encode", 0, total)
        done = 0
        for start in range(0, total, self.options.batch_size):
            batch = remaining[start : start + self.options.batch_size]
            s.clean = True  # an interrupt here loses nothing already applied
            images, ok_items, looks = [], [], {}
            for f, digest in batch:
                try:
                    images.append(load_image(f.abspath, max_pixels=self.options.max_pixels, reduce_for=size))
                    ok_items.append((f, digest))
                    looks[f.rel] = duplicates.look(images[-1])
                except ImageLoadError as exc:
                    s.clean = False
                    self.record_failure(f, digest, exc.reason)
                    s.clean = True
            vecs = self.encode(images, ok_items)
            s.clean = False
            if vecs is not None and ok_items:
                self.store_vectors(ok_items, *vecs)
                self.summary.encoded += len(ok_items)
                self.store_looks([(self.rows[f.rel], looks[f.rel]) for f, _ in ok_items])
            s.clean = True
            for im in images:
                im.close()
            done += len(batch)
            s.since_checkpoint += len(batch)
            if progress:
                progress("encode", done, total)
            self.checkpoint_if_due()
        s.clean = False

    def encode_videos(self, clips: List[Tuple[FoundFile, str]]) -> None:
        """Each clip's sampled frames (leanclip.video), encoded in batches like photos; a frame
        is a key of its own (the ``frames`` table: key, clip, time) and the clip's row holds
        its first frame's key. A clip is applied whole between checkpoints: a kill loses at
        most the clip being read. A clip that cannot be read is recorded as failed."""
        from leanclip.video import VideoError, sample_frames

        s, progress = self.state, self.progress
        size = model_image_size(self.encoder)
        for n, (f, digest) in enumerate(clips):
            if progress:
                progress("video", n, len(clips))
            old = self.rows.get(f.rel)
            if old is not None and old.key is not None:
                self.remove_keys([old.key])  # the previous version's frames
            added: List[int] = []
            try:
                batch: List[Tuple[float, Any]] = []
                for item in sample_frames(f.abspath, self.options.video_interval, reduce_for=size):
                    batch.append(item)
                    if len(batch) == self.options.batch_size:
                        added += self.store_frames(f.rel, batch)
                        batch = []
                if batch:
                    added += self.store_frames(f.rel, batch)
            except VideoError as exc:
                if added:
                    self.remove_keys(added[:1])
                self.rows.pop(f.rel, None)
                self.record_failure(f, digest, exc.reason)
                continue
            row = f.ok_row(digest, added[0])
            db.write_row(s.conn, row)
            if old is None:
                self.summary.added += 1
            else:
                self.summary.updated += 1
            self.rows[f.rel] = row
            self.summary.encoded += 1
            self.summary.frames += len(added)
            s.dirty = True
            s.since_checkpoint += max(1, len(added))
            self.checkpoint_if_due()
        if progress and clips:
            progress("video", len(clips), len(clips))

    def store_frames(self, rel: bytes, batch: List[Tuple[float, Any]]) -> List[int]:
        """Encode and add one batch of a clip's frames; returns their keys."""
        from leanclip.video import VideoError

        s = self.state
        images = [im for _, im in batch]
        try:
            vecs, sims = self.encode_batch(images)
        except Exception as exc:  # the model refused a frame: the clip fails with the reason
            raise VideoError(rel, f"encoder failed: {_describe(exc)}") from None
        finally:
            for im in images:
                im.close()
        finite = np.isfinite(vecs).all(axis=1) & (np.linalg.norm(vecs, axis=1) > 0)
        if not finite.all():
            raise VideoError(rel, "encoder produced a NaN or zero vector for a frame")
        keys = self.new_keys(len(batch))
        arr = np.asarray(keys, dtype=np.uint64)
        s.index.add(arr, vecs)
        if s.similar is not None and sims is not None:
            s.similar.add(arr, sims)
        s.conn.executemany(
            "INSERT INTO frames (key, path, t_ms) VALUES (?, ?, ?)",
            [(k, rel, int(round(t * 1000))) for k, (t, _) in zip(keys, batch)],
        )
        return keys

    def encode_batch(self, images: List[Any]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(joint, image-to-image) vectors of ``images`` from one run of the image model; the
        second is None unless the gallery keeps image-to-image vectors."""
        enc = self.encoder
        if self.state.similar is None:
            return np.asarray(enc.encode_images(images), dtype=np.float32), None
        joint, sim = enc.encode_images_all(images)  # type: ignore[attr-defined]
        return np.asarray(joint, dtype=np.float32), np.asarray(sim, dtype=np.float32)

    def encode(
        self, images: List[Any], items: List[Tuple[FoundFile, str]]
    ) -> Optional[Tuple[np.ndarray, Optional[np.ndarray]]]:
        if not images:
            return None
        try:
            return self.encode_batch(images)
        except BundleError:
            raise  # the model cannot run at all (it failed its self-check): no photo is at fault
        except Exception:
            if len(images) == 1:
                raise
        # a batch failed: encode one by one to find the file at fault
        vecs, sims, keep = [], [], []
        for im, item in zip(images, items):
            try:
                v, sv = self.encode_batch([im])
                vecs.append(v[0])
                if sv is not None:
                    sims.append(sv[0])
                keep.append(item)
            except BundleError:
                raise
            except Exception as exc:  # the model refused this image; record, go on
                self.record_failure(item[0], item[1], f"encoder failed: {_describe(exc)}")
        items[:] = keep
        if not vecs:
            return None
        return np.stack(vecs), (np.stack(sims) if sims else None)

    def new_keys(self, n: int) -> List[int]:
        start = self.state.next_key
        self.state.next_key = start + n
        return list(range(start, start + n))

    def remove_keys(self, keys: Any) -> None:
        """Drop ``keys`` from the index and from the image-to-image index in step; the key of
        a clip (its first frame's) takes all the clip's frames with it."""
        arr = np.asarray(keys, dtype=np.uint64)
        conn = self.state.conn
        clips = [(int(k),) for k in arr.tolist()]
        paths: set = set()
        for (k,) in clips:
            paths |= {bytes(p) for (p,) in conn.execute("SELECT path FROM frames WHERE key = ?", (k,))}
        if paths:
            frame_keys = [
                int(k) for p in paths for (k,) in conn.execute("SELECT key FROM frames WHERE path = ?", (p,))
            ]
            arr = np.unique(np.concatenate([arr, np.asarray(frame_keys, dtype=np.uint64)]))
            conn.executemany("DELETE FROM frames WHERE path = ?", [(p,) for p in paths])
        self.state.index.remove(arr)
        if self.state.similar is not None:
            self.state.similar.remove(arr)
        # their near-duplicate pairs and text go in the same commit
        gone = [(int(k),) for k in arr.tolist()]
        conn.executemany("DELETE FROM near WHERE a = ?1 OR b = ?1", gone)
        conn.executemany("DELETE FROM near_done WHERE key = ?", gone)
        conn.executemany("DELETE FROM looks WHERE key = ?", gone)
        conn.executemany("DELETE FROM texts WHERE rowid = ?", gone)

    def store_vectors(
        self, items: List[Tuple[FoundFile, str]], vecs: np.ndarray, sims: Optional[np.ndarray] = None
    ) -> None:
        s, rows, summary = self.state, self.rows, self.summary
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(items), -1)
        finite = np.isfinite(vecs).all(axis=1) & (np.linalg.norm(vecs, axis=1) > 0)
        if s.similar is not None:
            if sims is None:
                raise GalleryError("internal: image-to-image vectors missing for a model that has them")
            sims = np.asarray(sims, dtype=np.float32).reshape(len(items), -1)
            finite &= np.isfinite(sims).all(axis=1) & (np.linalg.norm(sims, axis=1) > 0)
        keys = self.new_keys(len(items))
        old_keys = [rows[f.rel].key for f, _ in items if f.rel in rows and rows[f.rel].key is not None]
        if old_keys:
            self.remove_keys(old_keys)
        good = [i for i in range(len(items)) if finite[i]]
        if good:
            good_keys = np.asarray([keys[i] for i in good], dtype=np.uint64)
            s.index.add(good_keys, vecs[good])
            if s.similar is not None and sims is not None:
                s.similar.add(good_keys, sims[good])
        for i, (f, digest) in enumerate(items):
            if not finite[i]:
                self.record_failure(f, digest, "encoder produced a NaN or zero vector")
                continue
            if f.rel in rows:
                summary.updated += 1
            else:
                summary.added += 1
            row = f.ok_row(digest, keys[i])
            db.write_row(s.conn, row)
            rows[f.rel] = row
        s.dirty = True

    def record_failure(self, f: FoundFile, digest: Optional[str], reason: str) -> None:
        old = self.rows.get(f.rel)
        if old is not None and old.key is not None:
            self.remove_keys([old.key])
        row = FileRow(f.rel, f.size, f.mtime_ns, digest, None, "failed", reason, f.ino, f.ctime_ns)
        db.write_row(self.state.conn, row)
        self.rows[f.rel] = row
        self.summary.failed += 1
        self.summary.failures.append((display(f.rel), reason))
        self.state.dirty = True
