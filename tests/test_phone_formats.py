"""HEIC/HEIF (pillow-heif) and AVIF (Pillow) through the one image loader: decoded like any
other format, under the same size and bomb limits, and refused with a reason naming the
extra when the plugin is missing. Test files are generated with pillow-heif / Pillow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from leanclip.images import ImageLoadError, load_image, register_formats


def _photo(path: Path, size=(96, 64), seed=0) -> np.ndarray:
    register_formats()
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = (220, 30, 30)
    arr[:, size[0] // 2 :] = (30, 40, 220)
    arr = np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return arr


@pytest.mark.parametrize("ext,fmt", [("heic", "HEIF"), ("heif", "HEIF"), ("avif", "AVIF")])
def test_phone_formats_decode_like_a_jpeg(tmp_path, ext, fmt):
    arr = _photo(tmp_path / f"p.{ext}")
    with Image.open(tmp_path / f"p.{ext}") as im:
        assert im.format == fmt
    out = load_image(tmp_path / f"p.{ext}")
    assert out.mode == "RGB" and out.size == (96, 64)
    # lossy, but the picture is the one saved: red left half, blue right half
    got = np.asarray(out).astype(np.int32)
    assert np.abs(got - arr.astype(np.int32)).mean() < 12
    small = load_image(tmp_path / f"p.{ext}", reduce_for=16)
    assert min(small.size) >= 32  # reduced by an integer factor, short side kept >= 2x


@pytest.mark.parametrize("ext", ["heic", "avif"])
def test_phone_formats_obey_the_pixel_limit(tmp_path, ext):
    _photo(tmp_path / f"big.{ext}", size=(400, 300))
    with pytest.raises(ImageLoadError, match="too large: declares 400x300"):
        load_image(tmp_path / f"big.{ext}", max_pixels=100_000)


@pytest.mark.parametrize("ext,what", [("heic", "HEIC/HEIF"), ("avif", "AVIF")])
def test_corrupt_phone_files_fail_with_a_reason(tmp_path, ext, what):
    _photo(tmp_path / f"ok.{ext}", size=(128, 96))
    data = (tmp_path / f"ok.{ext}").read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "header only": data[:40],
        "garbage": data[:24] + b"\0" * 300,
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}.{ext}"
        p.write_bytes(blob)
        with pytest.raises(ImageLoadError) as info:
            load_image(p)
        reason = info.value.reason
        assert reason and "\n" not in reason, (name, reason)
        assert ("corrupt" in reason or "truncated" in reason) and "pip install" not in reason, (name, reason)


def test_missing_pillow_heif_names_the_extra(tmp_path):
    _photo(tmp_path / "p.heic")
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["pillow_heif"] = None  # as if not installed
        from leanclip.images import ImageLoadError, load_image
        try:
            load_image({str(tmp_path / "p.heic")!r})
        except ImageLoadError as exc:
            print(exc.reason)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (
        out.stdout.strip() == "HEIC/HEIF needs pillow-heif (not installed): pip install 'leanclip[heif]'"
    ), out


@pytest.mark.parametrize("ext", ["heic", "avif", "png", "jpg"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_each_format_is_turned_as_its_exif_says(tmp_path, ext, orientation):
    """load_image skips ImageOps.exif_transpose's copy for an upright photo (images._upright):
    the pixels are still those of the reference path, turned when EXIF says so."""
    register_formats()
    rng = np.random.default_rng(orientation)
    arr = np.clip(rng.normal(128, 60, (64, 96, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{ext}"
    im.save(path, exif=exif.tobytes())
    with Image.open(path) as ref_file:
        ref = ImageOps.exif_transpose(ref_file).convert("RGB")
    for reduce_for in (None, 16):
        out = load_image(path, reduce_for=reduce_for)
        assert (out.width < out.height) == (orientation in (6, 8)), (ext, orientation, out.size)
        if reduce_for is None:
            assert out.size == ref.size
            assert np.array_equal(np.asarray(out), np.asarray(ref)), (ext, orientation)
