"""One update run: its options, state and summary, and the writes every stage makes through it
(new keys, vectors, looks, failures), made durable by checkpoints (the commit protocol of
:mod:`leanclip.gallery.sync`)."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from leanclip._pool import default_decode_threads
from leanclip.gallery import kinds
from leanclip.gallery import store as db
from leanclip.gallery.errors import GalleryError
from leanclip.gallery.scan import FoundFile
from leanclip.gallery.store import FileRow, StoreLayout, display
from leanclip.images import DEFAULT_MAX_PIXELS

__all__ = ["Progress", "UpdateOptions", "UpdateSummary", "UpdateState", "UpdateRun"]

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
    # threads decoding photos (the next batch's while one is encoded); 1: one by one, in turn
    decode_threads: int = field(default_factory=default_decode_threads)
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


class UpdateRun:
    """One update run over an open write transaction (``UpdateState``): what its stages
    (:mod:`~leanclip.gallery.reconcile`, :mod:`~leanclip.gallery.encoding`,
    :mod:`~leanclip.gallery.upkeep`) share, and the writes they make through it."""

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

    # -- writes ----------------------------------------------------------------------------

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
