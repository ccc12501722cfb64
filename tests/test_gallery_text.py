"""Text in photos (``--ocr``): real OCR (rapidocr-onnxruntime) on generated images of rendered
text, the ``text:`` query syntax with the semantic query and + / -, incremental reading, the
missing extra named, and kill-safety of the texts table."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from leanclip.gallery import Gallery
from tests._fixtures_gallery import COLORS, ColorEncoder, make_photo, update_worker_command

REPO = Path(__file__).resolve().parent.parent
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans where Debian ships it, else Pillow's own scalable default font."""
    if DEJAVU.is_file():
        return ImageFont.truetype(str(DEJAVU), size)
    return ImageFont.load_default(size=size)


def text_image(path: Path, lines, bg=(255, 255, 255), size=30) -> Path:
    im = Image.new("RGB", (700, 80 + 60 * len(lines)), bg)
    d = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        d.text((24, 40 + 60 * i), line, fill=(0, 0, 0), font=font(size))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    text_image(root / "receipt.jpg", ["GROCERY STORE", "TOTAL 42.50 EUR"])
    text_image(root / "sign.png", ["Platform 9 to London"], bg=(250, 250, 210))
    text_image(root / "slide.png", ["Quarterly results", "TOTAL revenue"], bg=(255, 255, 255))
    make_photo(root / "red.jpg", COLORS["red"], seed=1)
    g = Gallery(root, model=ColorEncoder(), ocr=True)
    s = g.update()
    assert s.texts == 4 and s.failed == 0
    return root


def test_text_queries_find_the_words_in_photos(folder):
    g = Gallery(folder, model=ColorEncoder())
    assert [h.name for h in g.search('text:"total 42.50"')] == ["receipt.jpg"]
    assert [h.name for h in g.search("text:london")] == ["sign.png"]
    assert sorted(h.name for h in g.search("text:total")) == ["receipt.jpg", "slide.png"]
    # with + / -: a negative text term excludes, the semantic term ranks
    assert [h.name for h in g.search("text:total -text:revenue")] == ["receipt.jpg"]
    assert [h.name for h in g.search("white text:total", k=5)] == [
        h.name for h in g.search("white", k=10) if h.name in ("receipt.jpg", "slide.png")
    ]
    assert "sign.png" not in {h.name for h in g.search("white -text:london", k=10)}
    assert g.search('text:"42.50 total"') == []  # a phrase: the words in that order
    hit = g.search('text:"total 42.50"')[0]
    # the words as read (the recogniser may drop the spaces between them), marked
    assert hit.text is not None and "\x02TOTAL42.50\x03" in "".join(hit.text.split())
    assert hit.to_dict()["text"] == hit.text


def test_text_reading_is_incremental_and_kept_across_runs(folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    s = Gallery(root, model=ColorEncoder()).update()  # no --ocr: the store's choice is kept
    assert s.texts == 0 and s.unchanged == 4
    text_image(root / "new.png", ["Hello Berlin"])
    s = Gallery(root, model=ColorEncoder()).update()
    assert s.texts == 1 and s.encoded == 1
    assert [h.name for h in Gallery(root, model=ColorEncoder()).search("text:berlin")] == ["new.png"]
    s = Gallery(root, model=ColorEncoder(), ocr=False).update()
    text_image(root / "later.png", ["Goodbye Paris"])
    s = Gallery(root, model=ColorEncoder()).update()
    assert s.texts == 0  # turned off: new photos are not read


def test_turning_ocr_on_reads_old_photos_without_re_encoding(tmp_path):
    root = tmp_path / "p"
    text_image(root / "a.png", ["Museum tickets"])
    Gallery(root, model=ColorEncoder()).update()
    enc = ColorEncoder()
    s = Gallery(root, model=enc, ocr=True).update()
    assert s.texts == 1 and enc.images_encoded == 0
    assert [h.name for h in Gallery(root, model=ColorEncoder()).search("text:museum")] == ["a.png"]


def test_missing_ocr_extra_is_one_line_naming_it(tmp_path):
    root = tmp_path / "p"
    make_photo(root / "a.jpg", COLORS["red"])
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["rapidocr_onnxruntime"] = None  # as if not installed
        from click.testing import CliRunner
        from leanclip.cli import main
        import tests._fixtures_gallery as F
        import leanclip.gallery as G
        real = G.Gallery
        class C(real):
            def __init__(self, root, store=None, model=None, **kw):
                super().__init__(root, store=store, model=F.ColorEncoder(), **kw)
        G.Gallery = C
        r = CliRunner().invoke(main, ["index", {str(root)!r}, "--ocr"])
        print(r.exit_code)
        print(r.output)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    code_line, message = out.stdout.split("\n", 1)
    assert code_line == "3", out
    assert message.strip().splitlines()[-1] == (
        "error: reading text in photos (--ocr) needs rapidocr-onnxruntime (not installed): "
        "pip install 'leanclip[ocr]'"
    ), out


def test_sigkill_while_reading_text_keeps_texts_in_step(tmp_path):
    root = tmp_path / "p"
    for i in range(8):
        text_image(root / f"t{i}.png", [f"Ticket number {100 + i}"])
    killed = 0
    for delay in (1.5, 3.0, 4.5):
        argv = update_worker_command(
            root, ocr=True, checkpoint_every=1, checkpoint_seconds=0.0, checkpoint_overhead=1.0
        )
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        db = root / ".leanclip" / "gallery.db"
        if not db.exists():  # killed before the update created the store (a slow start)
            continue
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "texts" in tables:
            live = "SELECT key FROM files WHERE status='ok'"
            assert conn.execute(f"SELECT count(*) FROM texts WHERE rowid NOT IN ({live})").fetchone()[0] == 0
        else:  # the schema is created in one transaction: all of it, or none
            assert "files" not in tables, tables
        conn.close()
    assert killed >= 2
    g = Gallery(root, model=ColorEncoder())
    g.update()
    conn = sqlite3.connect(root / ".leanclip" / "gallery.db")
    bodies = dict(conn.execute("SELECT rowid, body FROM texts").fetchall())
    conn.close()
    assert len(bodies) == 8 and g.check() == ([], [])
    for i in range(8):
        assert [h.name for h in g.search(f'text:"number {100 + i}"')] == [f"t{i}.png"]
