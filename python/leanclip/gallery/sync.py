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

This module drives a run (:func:`run_update`: the writer lock, the store's settings, the
stages in order, the last commit or the roll-back); the run itself, with its writes and
checkpoints, is :class:`~leanclip.gallery.run.UpdateRun`, and its stages are
:mod:`~leanclip.gallery.scan` (the folder), :mod:`~leanclip.gallery.reconcile` (the rows),
:mod:`~leanclip.gallery.encoding` (the vectors) and :mod:`~leanclip.gallery.upkeep` (the
index's kind and recall, dates, near-duplicates, text).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from leanclip.gallery import encoding, kinds, reconcile, upkeep
from leanclip.gallery import store as db
from leanclip.gallery.errors import GalleryBusyError, GalleryError
from leanclip.gallery.model import model_image_size, similarity_dim
from leanclip.gallery.run import Progress, UpdateOptions, UpdateRun, UpdateState, UpdateSummary
from leanclip.gallery.scan import IMAGE_EXTENSIONS, is_video, scan
from leanclip.gallery.store import StoreLayout, display
from leanclip.video import VIDEO_EXTENSIONS

__all__ = [
    "IMAGE_EXTENSIONS",
    "Progress",
    "UpdateOptions",
    "UpdateState",
    "UpdateSummary",
    "display",
    "model_image_size",
    "run_update",
]


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


def _roll_back(conn: Optional[sqlite3.Connection], run: Optional[UpdateRun], exc: BaseException) -> None:
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
    run: Optional[UpdateRun] = None
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
        run = UpdateRun(layout, enc, options, state, summary, progress)
        run.video = settings.video
        if settings.ocr:
            from leanclip.ocr import TextReader

            run.text_reader = TextReader()  # a missing extra fails here, before any work
        _run_stages(run)
        upkeep.keep_ivf(run)
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


def _run_stages(run: UpdateRun) -> None:
    """The stages of a run, in order (the module docstring tells them)."""
    s = run.state
    s.last_checkpoint = time.monotonic()
    s.since_checkpoint = 0
    extensions = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if run.video else IMAGE_EXTENSIONS
    scanned = scan(os.fspath(run.layout.root), os.fspath(run.layout.store), run.progress, extensions)
    # the gallery's size after this run; a folder that cannot be listed keeps its rows
    n = len(scanned.found) if not scanned.unreadable else max(len(scanned.found), len(s.index))
    upkeep.convert_index(run, n)
    run.rows = db.load_rows(s.conn)
    reconcile.record_bad(run, scanned.bad)
    to_hash, missing = reconcile.classify(run, scanned)
    to_encode = reconcile.hash_changed(run, to_hash, missing)
    reconcile.remove_missing(run, missing)
    remaining = reconcile.copy_duplicates(run, to_encode)
    run.checkpoint_if_due(force=True)
    encoding.encode_photos(run, [item for item in remaining if not is_video(item[0].rel)])
    encoding.encode_videos(run, [item for item in remaining if is_video(item[0].rel)])
    upkeep.fill_dates(run)
    upkeep.update_near(run)
    upkeep.read_texts(run)
