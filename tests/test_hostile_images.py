"""Hostile image files: decompression bombs (a huge declared size), truncated and 0-byte files,
wrong extensions, a directory and a FIFO named like images. Through ``Encoder.load_image`` each
raises ``ImageLoadError`` naming the file and the reason; through ``Gallery.update()`` each is
recorded as failed with a clear reason while the good photos are indexed; memory stays bounded
(the bombs are refused from their headers, before any pixel is decoded).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fixtures_gallery import COLORS, ColorEncoder, make_photo  # noqa: E402


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_declaring(w: int, h: int, idat: bytes = b"", mode: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, mode, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def real_png_bomb(side: int) -> bytes:
    """A valid grayscale PNG of side x side zero pixels: a few hundred KB on disk, side**2 bytes
    (x3 as RGB) once decoded."""
    row = b"\0" + b"\0" * side  # filter byte + pixels
    comp = zlib.compressobj(9)
    out = [comp.compress(row) for _ in range(side)] + [comp.flush()]
    return png_declaring(side, side, b"".join(out), mode=0)


def jpeg_declaring(w: int, h: int) -> bytes:
    """A real small JPEG whose SOF marker is patched to declare w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, h, w)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def gif_declaring(w: int, h: int) -> bytes:
    head = b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0)
    desc = b"," + struct.pack("<HHHHB", 0, 0, w, h, 0)
    return head + desc + b"\x02\x02\x44\x01\x00;"


GALLERY_LIMIT = 64_000_000  # leanclip.gallery.DEFAULT_MAX_PIXELS


def make_hostile(folder: Path) -> dict[str, str]:
    """Writes the hostile files; returns name -> regex its failure reason must match."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    good_jpg = good.getvalue()
    good_png = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(good_png, "PNG")
    files = {
        "bomb_header.png": png_declaring(100_000, 100_000, b"\0" * 16),
        "bomb_real.png": real_png_bomb(9_000),  # 81 Mpx: over the gallery's limit, 24 KB... of zeros
        "bomb.jpg": jpeg_declaring(65_000, 65_000),
        "bomb.gif": gif_declaring(65_535, 65_535),
        "empty.jpg": b"",
        "empty.png": b"",
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "truncated.png": good_png.getvalue()[:60],
        "signature_only.png": b"\x89PNG\r\n\x1a\n",
        "text.jpg": b"this is a text file with an image extension\n" * 3,
        "random.webp": bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8)),
        "zero_size.png": png_declaring(0, 0),
        "strip.png": None,  # a real 1 x 6000 PNG of about 100 bytes (written below)
    }
    for name, blob in files.items():
        if blob is not None:
            (folder / name).write_bytes(blob)
    Image.new("RGB", (1, 6000), (200, 0, 0)).save(folder / "strip.png", optimize=True)
    (folder / "album.jpg").mkdir()
    os.mkfifo(folder / "pipe.png")
    return {
        "bomb_header.png": "decompression bomb",
        "bomb_real.png": "decompression bomb",
        "bomb.jpg": "decompression bomb",
        "bomb.gif": "decompression bomb",
        "empty.jpg": r"empty file \(0 bytes\)",
        "empty.png": r"empty file \(0 bytes\)",
        "truncated.jpg": "truncated",
        "truncated.png": "truncated|not a recognised",
        "signature_only.png": "truncated|not a recognised",
        "text.jpg": "not a recognised image format",
        "random.webp": "not a recognised image format",
        "zero_size.png": "no pixels|not a recognised|truncated",
        "strip.png": r"aspect ratio of 1x6000 is beyond 50:1",
        "album.jpg": "is a directory",
        "pipe.png": "not a regular file",
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    photos = root / "photos"
    expected = make_hostile(photos / "bad")
    make_photo(photos / "good" / "red.jpg", COLORS["red"], seed=1)
    make_photo(photos / "good" / "blue.png", COLORS["blue"], seed=2, fmt="PNG")
    # wrong extension but valid content: Pillow sniffs the format, so this one is fine
    make_photo(photos / "good" / "green_really_png.jpg", COLORS["green"], seed=3, fmt="PNG")
    return photos, expected


def test_bomb_files_are_small_on_disk(hostile):
    photos, _ = hostile
    for name in ("bomb_header.png", "bomb_real.png", "bomb.jpg", "bomb.gif"):
        assert (photos / "bad" / name).stat().st_size < 200_000, name
    assert (photos / "bad" / "strip.png").stat().st_size < 200
    with Image.open(photos / "bad" / "bomb_real.png") as im:  # a real, decodable image
        assert im.size == (9_000, 9_000)


def test_encoder_load_image_refuses_each_with_reason(hostile):
    from leanclip.encoder import Encoder, ImageLoadError

    photos, expected = hostile
    for name, pattern in expected.items():
        path = photos / "bad" / name
        with pytest.raises(ImageLoadError, match=pattern) as info:
            Encoder.load_image(path)
        assert info.value.path == str(path), name
        assert str(path) in str(info.value)
    # the Encoder's limit is a parameter: the 81 Mpx file is accepted under a higher one
    assert Encoder.load_image(photos / "bad" / "bomb_real.png", max_pixels=100_000_000).size == (9_000, 9_000)
    im = Encoder.load_image(photos / "good" / "green_really_png.jpg")
    assert im.size == (64, 48)


def test_gallery_records_each_hostile_file_as_failed(hostile, tmp_path):
    from leanclip.gallery import Gallery

    photos, expected = hostile
    g = Gallery(photos, store=tmp_path / "store", model=ColorEncoder())
    summary = g.update()
    failures = dict(g.failures())
    assert set(failures) == {f"bad/{n}" for n in expected}, failures
    import re

    for name, pattern in expected.items():
        assert re.search(pattern, failures[f"bad/{name}"]), (name, failures[f"bad/{name}"])
    assert summary.failed == len(expected)
    assert summary.added == 3
    assert {n for n, s, _ in g.files() if s == "ok"} == {
        "good/red.jpg",
        "good/blue.png",
        "good/green_really_png.jpg",
    }
    assert g.check() == ([], [])
    assert [h.name for h in g.search("red", k=1)] == ["good/red.jpg"]
    # a second update does not retry unchanged failures, and changes nothing
    again = g.update()
    assert (again.added, again.updated, again.removed, again.encoded) == (0, 0, 0, 0)
    assert dict(g.failures()) == failures
    g.close()


_MEMORY_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from leanclip.gallery import Gallery
from leanclip.images import load_image
from leanclip.encoder import Encoder, ImageLoadError
from _fixtures_gallery import ColorEncoder
photos, store = Path(sys.argv[1]), Path(sys.argv[2])
# warm up every code path on a good photo first, so imports do not count
load_image(photos / "good" / "red.jpg", reduce_for=224); Encoder.load_image(photos / "good" / "red.jpg")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for p in sorted((photos / "bad").iterdir()):
    if p.name != "bomb_real.png":
        try:
            Encoder.load_image(p)
        except ImageLoadError:
            pass
g = Gallery(photos, store=store, model=ColorEncoder())
s = g.update()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "after_kb": after, "failed": s.failed, "added": s.added}))
"""


def test_memory_stays_bounded(hostile, tmp_path):
    photos, expected = hostile
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEMORY_PROBE,
            str(photos),
            str(tmp_path / "store"),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["failed"] == len(expected) and r["added"] == 3, r
    growth_mb = (r["after_kb"] - r["before_kb"]) / 1024
    # Decoding bomb_real.png alone would take 81 MB as L and 243 MB as RGB; the bombs of
    # 4.2-10 Gpx would take gigabytes. Refused from their headers, they cost next to nothing.
    assert growth_mb < 40, f"peak RSS grew by {growth_mb:.0f} MB"


@pytest.mark.slow
def test_real_encoder_encode_images_refuses_hostile_files(hostile, tmp_path):
    from _fixtures_bundle import make_tiny_bundle

    from leanclip.encoder import Encoder, ImageLoadError

    photos, expected = hostile
    enc = Encoder(make_tiny_bundle(tmp_path / "bundle"))
    good = enc.encode_images([photos / "good" / "red.jpg", photos / "good" / "green_really_png.jpg"])
    assert good.shape == (2, enc.dim) and np.isfinite(good).all()
    for name in expected:
        if name == "bomb_real.png":
            continue
        with pytest.raises(ImageLoadError):
            enc.encode_images([photos / "good" / "red.jpg", photos / "bad" / name])
