"""Issue 14 (hardening, round 2) for the gallery: each test failed on the code before it.

Unreadable folders keep their rows; a same-size, same-mtime swap is noticed (inode, ctime);
an old (version 1) store is read and migrated; a read-only store can be searched; a lock that is
a folder, a store that cannot be written and a query that is not UTF-8 are one-line errors;
a thin strip image is refused with a reason; an encoder failure always has a reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leanclip.gallery import Gallery, GalleryError
from tests._fixtures_gallery import COLORS, ColorEncoder, make_folder, make_photo


def _gallery(root: Path, enc: ColorEncoder | None = None, **kw) -> Gallery:
    return Gallery(root, model=enc or ColorEncoder(), **kw)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    return root


def _block_listing(monkeypatch: pytest.MonkeyPatch, blocked: Path) -> None:
    """os.walk cannot list ``blocked`` (as if it had mode 000 for a non-root user)."""
    real = os.scandir

    def scandir(path: object = ".") -> object:
        if os.path.realpath(os.fspath(path)) == os.path.realpath(blocked):  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fspath(path))  # type: ignore[arg-type]
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_root_keeps_every_row_and_reports_it(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = _gallery(folder)
    assert g.update().added == 8
    _block_listing(monkeypatch, folder)
    s = g.update()  # used to delete every row
    assert (s.removed, s.added, s.failed) == (0, 0, 0)
    assert s.unreadable == [(".", "Permission denied")]
    assert s.to_dict()["unreadable"] == [{"name": ".", "reason": "Permission denied"}]
    assert g.info()["ok"] == 8 and len(g.search("red", k=8)) == 8
    assert g.check() == ([], [])


def test_unreadable_subfolder_keeps_its_rows(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _gallery(folder)
    g.update()
    (folder / "blue" / "blue_0.jpg").unlink()  # a real deletion elsewhere still counts
    _block_listing(monkeypatch, folder / "red")
    s = g.update()
    assert s.removed == 1 and s.unreadable == [("red", "Permission denied")]
    names = {n for n, st, _ in g.files() if st == "ok"}
    assert {"red/red_0.jpg", "red/red_1.jpg"} <= names and "blue/blue_0.jpg" not in names


def _swap_keeping_size_and_mtime(a: Path, b: Path) -> None:
    """Swap the contents of two files of the same size; both keep their old mtime."""
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_size == sb.st_size
    tmp = a.with_name("swap.tmp")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    os.utime(a, ns=(sa.st_atime_ns, sa.st_mtime_ns))
    os.utime(b, ns=(sb.st_atime_ns, sb.st_mtime_ns))


def test_same_size_same_mtime_swap_is_noticed(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    a = make_photo(root / "a.bmp", COLORS["red"], seed=1, fmt="BMP")
    b = make_photo(root / "b.bmp", COLORS["blue"], seed=2, fmt="BMP")
    assert a.stat().st_size == b.stat().st_size  # uncompressed: same shape, same size
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    g = _gallery(root)
    g.update()
    assert [h.name for h in g.search("red", k=1)] == ["a.bmp"]
    _swap_keeping_size_and_mtime(a, b)
    s = g.update()
    assert s.renamed == 2 or s.updated == 2, s  # noticed: the vectors follow the content
    assert [h.name for h in g.search("red", k=1)] == ["b.bmp"]
    assert g.check() == ([], [])


def test_version_1_store_is_read_then_migrated(folder: Path) -> None:
    g = _gallery(folder)
    g.update()
    g.close()
    conn = sqlite3.connect(folder / ".leanclip" / "gallery.db")
    conn.execute("ALTER TABLE files DROP COLUMN ino")
    conn.execute("ALTER TABLE files DROP COLUMN ctime_ns")
    conn.execute("ALTER TABLE files DROP COLUMN taken")  # version 3's columns and tables
    conn.execute("ALTER TABLE files DROP COLUMN taken_from")
    for table in ("texts", "near", "near_done", "looks"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    g = _gallery(folder)
    assert {h.name for h in g.search("red", k=2)} == {"red/red_0.jpg", "red/red_1.jpg"}
    s = g.update()  # adds the columns; rows are re-hashed once, nothing re-encoded
    assert (s.encoded, s.added, s.removed, s.unchanged) == (0, 0, 0, 8)
    conn = sqlite3.connect(folder / ".leanclip" / "gallery.db")
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "4"
    assert conn.execute("SELECT count(*) FROM files WHERE ino IS NULL OR taken IS NULL").fetchone()[0] == 0
    conn.close()


def test_lock_that_is_a_folder_is_a_gallery_error(folder: Path) -> None:
    g = _gallery(folder)
    g.update()
    (folder / ".leanclip" / "lock").unlink()
    (folder / ".leanclip" / "lock").mkdir()
    with pytest.raises(GalleryError, match="lock.*is a directory"):
        g.update()


def test_query_text_that_is_not_utf8_is_a_gallery_error(folder: Path) -> None:
    g = _gallery(folder)
    g.update()
    bad = os.fsdecode(b"red \xff\xfe")
    with pytest.raises(GalleryError, match="not valid UTF-8"):
        g.search(bad)
    with pytest.raises(GalleryError, match="not valid UTF-8"):
        g.search("red -" + os.fsdecode(b"\xff"))


def test_thin_strip_is_refused_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_photo(root / "ok.png", COLORS["red"], fmt="PNG")
    Image.new("RGB", (1, 6000), (200, 0, 0)).save(root / "strip.png")
    Image.new("RGB", (6000, 1), (200, 0, 0)).save(root / "wide.png")
    g = _gallery(root)
    s = g.update()
    reasons = dict(g.failures())
    assert s.added == 1 and set(reasons) == {"strip.png", "wide.png"}
    assert "aspect ratio of 1x6000" in reasons["strip.png"] and "6000x1" in reasons["wide.png"]


def test_encoder_failure_reason_is_never_empty(folder: Path) -> None:
    class OutOfMemory(ColorEncoder):
        def encode_images(self, images, batch_size=32):
            if any(im.size == (64, 48) and np.asarray(im)[..., 0].mean() > 150 for im in images):
                raise MemoryError()  # what a memory cap gives: an empty message
            return super().encode_images(images)

    g = _gallery(folder, OutOfMemory())
    s = g.update()
    reasons = dict(g.failures())
    assert set(reasons) == {"red/red_0.jpg", "red/red_1.jpg", "yellow/yellow_0.jpg", "yellow/yellow_1.jpg"}
    assert all(r == "encoder failed: out of memory" for r in reasons.values()), reasons
    assert s.failed == 4 and s.added == 4


_AS_NOBODY = """
import ctypes, json, os, sys
sys.path[:0] = {path!r}
from PIL import Image
Image.init()
import difflib, numpy.ma, click.testing, rich.console, rich.table, rich.text, rich.markup  # before losing access
import leanclip, leanclip.cli, leanclip.errors, leanclip.gallery.sync
from leanclip import Index, IndexFileError
from leanclip.gallery import Gallery
from tests._fixtures_gallery import ColorEncoder
from click.testing import CliRunner
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setfsgid(65534)
    libc.setfsuid(65534)
    assert libc.setfsuid(-1) == 65534
try:
    open({probe!r}, "ab")
    print("STILL-WRITABLE")
except PermissionError:
    pass
out = {{}}
g = Gallery({root!r}, model=ColorEncoder())
out["api"] = [h.name for h in g.search("red", k=2)]
try:
    g.update()
except Exception as exc:
    out["update"] = [type(exc).__name__, isinstance(exc, leanclip.errors.LeanclipError), str(exc)]
from click.testing import CliRunner
leanclip.cli._open = lambda d, s, m, near=None: Gallery({root!r}, model=ColorEncoder())
r = CliRunner().invoke(leanclip.cli.main, ["search", "red", "-k", "2", "--json"])
out["cli"] = [r.exit_code, r.output + (repr(r.exception) if r.exit_code not in (0, 1) or not r.output else "")]
print(json.dumps(out))
"""


def test_read_only_gallery_can_be_searched(tmp_path: Path) -> None:
    """A gallery the user cannot write (read-only media, another user's store) is searched
    with a read-only store; updating it is a one-line GalleryError. Tests run as root, which
    writes anything: the reader runs in a subprocess whose filesystem user is 'nobody'."""
    base = Path(tempfile.mkdtemp(prefix="leanclip-ro-"))
    try:
        os.chmod(base, 0o755)
        root = base / "photos"
        make_folder(root, n_per_color=2)
        g = _gallery(root)
        g.update()
        g.close()
        for p in [root, *root.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        code = _AS_NOBODY.format(path=sys.path, probe=str(root / ".leanclip" / "gallery.db"), root=str(root))
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(), timeout=180
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "STILL-WRITABLE" not in res.stdout
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert sorted(out["api"]) == ["red/red_0.jpg", "red/red_1.jpg"]
        name, is_ours, msg = out["update"]
        assert name == "GalleryError" and is_ours and "cannot be written" in msg, out
        code_, output = out["cli"]
        assert code_ == 0, output
        assert {r["name"] for r in json.loads(output)["results"]} == {"red/red_0.jpg", "red/red_1.jpg"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_store_that_is_not_a_database_is_a_gallery_error(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=1)
    (root / ".leanclip").mkdir()
    (root / ".leanclip" / "gallery.db").write_bytes(bytes(range(256)) * 20)
    g = _gallery(root)
    for call in (g.info, lambda: g.search("red"), g.update):
        with pytest.raises(GalleryError, match="not a database"):
            call()


def test_truncated_mapped_index_is_a_gallery_error_then_recovers(folder: Path) -> None:
    # a serving gallery maps its index file; truncating it underneath must not crash the
    # process (SIGBUS) nor keep failing: one GalleryError, then the cache is dropped
    g = _gallery(folder)
    g.update()
    assert g.search("red", k=2)  # maps and caches the index
    gen = g.info()["generation"]
    path = g.layout.index_path(gen)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(GalleryError, match="changed or is damaged|damaged"):
        g.search("red", k=2)
    assert g._read.cached is None
    g.update()  # rebuilds the damaged file as a new generation
    hits = g.search("red", k=2)
    assert len(hits) == 2 and all(h.name.startswith("red/") for h in hits)
