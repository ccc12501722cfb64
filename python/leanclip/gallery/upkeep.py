"""What an update keeps up besides the vectors: the index's kind, precision, layout and recall
(:mod:`~leanclip.gallery.kinds`), capture dates, near-duplicate pairs
(:mod:`~leanclip.gallery.duplicates`), and the text read in photos (``--ocr``)."""

from __future__ import annotations

import os

import numpy as np

from leanclip.dates import capture_time
from leanclip.gallery import duplicates, kinds, texts
from leanclip.gallery import store as db
from leanclip.gallery.run import UpdateRun
from leanclip.images import ImageLoadError

__all__ = ["convert_index", "keep_ivf", "fill_dates", "update_near", "read_texts"]


def convert_index(run: UpdateRun, n: int) -> None:
    """Give the index the kind and precision a gallery of about ``n`` photos should have
    (gallery.kinds; an IVF index from before the automatic layout gets it), moving its
    stored vectors across: nothing is re-encoded. The converted index is saved as the next
    generation with its kind in the same commit."""
    s = run.state
    meta = db.read_meta(s.conn)
    current = kinds.kind_of(s.index)
    kind = kinds.want_kind(s.index_choice, current, n, run.options.auto_threshold)
    auto_layout = meta.get("ivf_layout") == kinds.AUTO_LAYOUT
    new = kinds.convert(s.index, kind, s.dtype, auto_layout, run.options.ivf_train_at)
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


def keep_ivf(run: UpdateRun) -> None:
    """Keep an IVF index's layout and recall: retrain it when it trained itself during the
    run (on the vectors that came first, in path order) or its size doubled or halved since
    it was trained (kinds.keep_layout), and tune it to the gallery's recall when it is not
    tuned to it or drifted (kinds.keep_recall; always after a retrain)."""
    s = run.state
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


def fill_dates(run: UpdateRun) -> None:
    """Capture dates of indexed photos that have none (a store from before dates existed):
    read from the files' headers, nothing re-encoded."""
    s, progress = run.state, run.progress
    todo = [bytes(p) for (p,) in s.conn.execute("SELECT path FROM files WHERE status='ok' AND taken IS NULL")]
    root = os.fsencode(run.layout.root)
    for i, rel in enumerate(todo):
        when = capture_time(os.fsdecode(os.path.join(root, rel)))
        s.conn.execute("UPDATE files SET taken=?, taken_from=? WHERE path=?", (when.wall, when.source, rel))
        s.dirty = True
        if progress and i % 256 == 0:
            progress("dates", i, len(todo))


def update_near(run: UpdateRun) -> None:
    """Near-duplicate pairs of the photos added since the last run (gallery.duplicates):
    the pairs of removed photos go, the new photos' neighbours are searched once."""
    s, conn = run.state, run.state.conn
    live = "SELECT key FROM files WHERE status='ok' AND key IS NOT NULL"
    conn.execute(f"DELETE FROM near_done WHERE key NOT IN ({live})")
    conn.execute(f"DELETE FROM near WHERE a NOT IN ({live}) OR b NOT IN ({live})")
    space = s.similar if s.similar is not None else s.index
    done = {int(k) for (k,) in conn.execute("SELECT key FROM near_done")}
    clips = {int(k) for (k,) in conn.execute("SELECT key FROM frames")}  # frames: not photos
    pending = [int(k) for (k,) in conn.execute(live) if int(k) not in done and int(k) not in clips]
    if not pending:
        return
    if run.progress:
        run.progress("duplicates", 0, len(pending))
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
    if run.progress:
        run.progress("duplicates", len(pending), len(pending))


def read_texts(run: UpdateRun) -> None:
    """The text in every indexed photo not read yet (with ``--ocr``), checkpointed as it
    goes like encoding: a kill loses at most the photos since the last checkpoint."""
    s, progress, reader = run.state, run.progress, run.text_reader
    if reader is None:
        return
    todo = s.conn.execute(
        "SELECT key, path FROM files WHERE status='ok' AND key NOT IN (SELECT rowid FROM texts) "
        "AND key NOT IN (SELECT key FROM frames)"
    ).fetchall()
    root = os.fsencode(run.layout.root)
    if progress:
        progress("text", 0, len(todo))
    for i, (key, rel) in enumerate(todo):
        s.clean = True
        try:
            text = reader.read(os.fsdecode(os.path.join(root, bytes(rel))), run.options.max_pixels)
        except ImageLoadError:
            text = ""  # changed since it was encoded: the next run re-encodes and reads it
        s.clean = False
        texts.store_text(s.conn, int(key), text)
        run.summary.texts += 1
        s.dirty = True
        s.since_checkpoint += 1
        if progress:
            progress("text", i + 1, len(todo))
        run.checkpoint_if_due()
    s.clean = False
