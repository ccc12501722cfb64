"""What a scan changes in the store before anything is encoded: entries that cannot be images
are recorded as failed, unchanged files are counted, changed and new ones hashed, renames and
copies recognised by content (a copy reuses the stored vector), and the rows of deleted files
dropped."""

from __future__ import annotations

from typing import Dict, List, Tuple

from leanclip.bundle import sha256_file
from leanclip.dates import capture_time
from leanclip.gallery import store as db
from leanclip.gallery.run import UpdateRun
from leanclip.gallery.scan import FoundFile, ScanResult, is_video
from leanclip.gallery.store import FileRow, display

__all__ = ["record_bad", "classify", "hash_changed", "remove_missing", "copy_duplicates"]


def record_bad(run: UpdateRun, bad: List[Tuple[bytes, str]]) -> None:
    """Entries that look like images but are not files: recorded as failed."""
    s, summary = run.state, run.summary
    for rel, reason in bad:
        old = run.rows.get(rel)
        if old and old.status == "failed":
            summary.unchanged += 1
            continue
        if old and old.key is not None:
            run.remove_keys([old.key])
        db.write_row(s.conn, FileRow(rel, 0, 0, None, None, "failed", reason))
        summary.failed += 1
        summary.failures.append((display(rel), reason))
        s.dirty = True


def classify(run: UpdateRun, scanned: ScanResult) -> Tuple[List[FoundFile], Dict[bytes, FileRow]]:
    """The found files to hash (new or changed), and the rows whose file is missing."""
    rows, summary = run.rows, run.summary
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


def hash_changed(run, to_hash: List[FoundFile], missing: Dict[bytes, FileRow]) -> List[Tuple[FoundFile, str]]:
    """Hashes ``to_hash``: a file with its old content keeps its row, one with the content
    of a missing row is that file renamed (its row moves; taken out of ``missing``); the
    rest, with their digests, are to encode."""
    s, summary, conn, progress, rows = run.state, run.summary, run.state.conn, run.progress, run.rows
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
            run.record_failure(f, None, f"cannot read: {exc.strerror or exc}")
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


def remove_missing(run: UpdateRun, missing: Dict[bytes, FileRow]) -> None:
    """Deleted files leave the index and the database."""
    if not missing:
        return
    gone = [r.key for r in missing.values() if r.key is not None]
    if gone:
        run.remove_keys(gone)
    run.state.conn.executemany("DELETE FROM files WHERE path=?", [(rel,) for rel in missing])
    run.summary.removed += len(missing)
    run.state.dirty = True


def copy_duplicates(run: UpdateRun, to_encode: List[Tuple[FoundFile, str]]) -> List[Tuple[FoundFile, str]]:
    """Duplicates of already indexed content reuse the stored vector (and look); returns
    the files still to encode."""
    s, conn, index = run.state, run.state.conn, run.state.index
    remaining: List[Tuple[FoundFile, str]] = []
    for f, digest in to_encode:
        dup = conn.execute(
            "SELECT key FROM files WHERE sha256=? AND status='ok' AND path<>? LIMIT 1", (digest, f.rel)
        ).fetchone()
        if dup is not None and int(dup[0]) in index and not is_video(f.rel):
            vec = index.get([int(dup[0])])
            sim = s.similar.get([int(dup[0])]) if s.similar is not None else None
            run.store_vectors([(f, digest)], vec, sim)
            run.summary.copied += 1
            got = db.read_looks(conn, [int(dup[0])]).get(int(dup[0]))
            if got is not None:
                run.store_looks([(run.rows[f.rel], got)])
        else:
            remaining.append((f, digest))
    return remaining
