"""The scan of an update: the image (and video) files under the gallery's folder, as found.

Symlinks are not followed; hidden folders and the store are skipped; a folder that cannot be
listed is reported (its rows are kept); an entry named like an image that cannot be one (a
folder, a device) is reported with the reason.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from leanclip.dates import capture_time
from leanclip.gallery.store import FileRow
from leanclip.images import PHONE_EXTENSIONS
from leanclip.video import VIDEO_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS", "FoundFile", "ScanResult", "scan", "is_video"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} | PHONE_EXTENSIONS
)


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


def is_video(rel: bytes) -> bool:
    return os.path.splitext(rel)[1].lower().decode("ascii", "replace") in VIDEO_EXTENSIONS


def scan(
    root: str,
    store: str,
    progress: Optional[Callable[[str, int, int], None]],
    extensions: "frozenset[str]" = IMAGE_EXTENSIONS,
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
