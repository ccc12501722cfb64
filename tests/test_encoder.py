"""leanclip.Encoder on tiny exported bundles: parity with torch/open_clip, odd inputs, no torch."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leanclip.bundle import BundleError
from leanclip.encoder import Encoder, ImageLoadError, preprocess_image
from tests._fixtures_bundle import ROOT, make_tiny_clip, tiny_bundle, tiny_bundle_int8  # noqa: F401

TEXTS = [
    "a photo of a dog",
    "",
    "Two people riding bicycles along a beach at sunset",
    "café 🐱 &amp; 42",
    " ".join(["very long caption"] * 60),
]


@pytest.fixture(scope="module")
def enc(tiny_bundle: Path) -> Encoder:
    return Encoder(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def model():
    # the same seed as make_tiny_bundle's default: the exported weights
    return make_tiny_clip(dim=32, seed=0)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


# ------------------------------------------------------------------------------------------- text


def test_attributes(enc: Encoder, tiny_bundle: Path):
    assert enc.dim == 32
    assert enc.name == "tiny-clip"
    assert enc.model_id == enc.manifest.model_id and enc.model_id.startswith("tiny-clip-fp32-")
    assert enc.manifest.precision == "fp32"


def test_text_embeddings_match_open_clip(enc: Encoder, model):
    import open_clip
    import torch

    got = enc.encode_text(TEXTS)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = model.encode_text(open_clip.tokenize(TEXTS)).numpy()
    assert _cos(got, ref).min() > 0.999


def test_text_batching_and_order_do_not_change_results(enc: Encoder):
    full = enc.encode_text(TEXTS, batch_size=64)
    one = enc.encode_text(TEXTS, batch_size=1)
    two = enc.encode_text(TEXTS, batch_size=2)
    np.testing.assert_allclose(full, one, atol=1e-5)
    np.testing.assert_allclose(full, two, atol=1e-5)
    rev = enc.encode_text(TEXTS[::-1])
    np.testing.assert_allclose(full, rev[::-1], atol=1e-5)


def test_long_text_is_truncated_like_open_clip(enc: Encoder):
    long = " ".join(f"w{i}" for i in range(200))
    (ids,) = enc.tokenize([long])
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    # the part past the context does not matter
    a, b = enc.encode_text([long, long + " and many more words at the end"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_empty_string_encodes_as_start_end(enc: Encoder):
    assert enc.tokenize(["", "  "]) == [[49406, 49407], [49406, 49407]]
    e = enc.encode_text([""])
    assert np.isfinite(e).all() and abs(np.linalg.norm(e) - 1) < 1e-5


def test_text_type_errors_name_the_index(enc: Encoder):
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        enc.encode_text(["a", "b", 3])
    with pytest.raises(TypeError, match="single str"):
        enc.encode_text("a dog")
    with pytest.raises(TypeError, match=r"texts\[0\] is NoneType"):
        enc.encode_text([None])


def test_empty_inputs_give_empty_arrays(enc: Encoder):
    assert enc.encode_text([]).shape == (0, 32)
    assert enc.encode_images([]).shape == (0, 32)


# ------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("wh", [(640, 480), (480, 640), (224, 224), (33, 500), (7, 5), (1000, 999)])
def test_preprocessing_matches_open_clip(size, wh):
    import open_clip

    img = _photo(*wh, seed=wh[0])
    ref = open_clip.image_transform(size, is_train=False)(img).numpy()
    got = preprocess_image(img, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert got.shape == ref.shape == (3, size, size)
    # 1e-3 per pixel after normalization (in practice identical: both resize with Pillow)
    assert np.abs(got - ref).max() < 1e-3


def test_image_embeddings_match_torch(enc: Encoder, model):
    import open_clip
    import torch

    imgs = [_photo(64, 48, 1), _photo(40, 90, 2), _photo(32, 32, 3)]
    got = enc.encode_images(imgs)
    assert got.shape == (3, 32) and got.dtype == np.float32
    tf = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([tf(i) for i in imgs])).numpy()
    assert _cos(got, ref).min() > 0.999
    # paths and PIL images give the same result; batching does not matter
    np.testing.assert_allclose(enc.encode_images(imgs, batch_size=1), got, atol=1e-5)


def test_paths_and_images_agree(enc: Encoder, tmp_path: Path):
    img = _photo(50, 70, 5)
    p = tmp_path / "a.png"
    img.save(p)
    np.testing.assert_allclose(enc.encode_images([p]), enc.encode_images([img]), atol=1e-6)
    np.testing.assert_allclose(enc.encode_images([str(p)]), enc.encode_images([img]), atol=1e-6)


def test_image_type_error_names_the_index(enc: Encoder):
    with pytest.raises(TypeError, match=r"images\[1\] is int"):
        enc.encode_images([_photo(8, 8), 5])
    with pytest.raises(TypeError, match="wrap a single one"):
        enc.encode_images(_photo(8, 8))


# ---------------------------------------------------------------------------------------- odd files


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_grayscale_cmyk_palette_rgba_convert_like_pillow(enc: Encoder, tmp_path: Path):
    rgb = _photo(40, 30, 7)
    cases = {
        "gray.png": rgb.convert("L"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "palette.png": rgb.convert("P"),
        "rgba.png": rgb.convert("RGBA"),
        "la.png": rgb.convert("LA"),
        "bilevel.png": rgb.convert("1"),
    }
    for name, img in cases.items():
        path = _save(img, tmp_path / name)
        loaded = Encoder.load_image(path)
        assert loaded.mode == "RGB" and loaded.size == (40, 30), name
        with Image.open(path) as raw:
            expected = np.asarray(raw.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(loaded), expected)
    embs = enc.encode_images([tmp_path / n for n in cases])
    assert np.isfinite(embs).all()


def test_palette_with_transparency(tmp_path: Path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.info["transparency"] = 0
    path = _save(img, tmp_path / "t.gif", transparency=0)
    loaded = Encoder.load_image(path)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 0, 0)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path):
    arr = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    loaded = np.asarray(Encoder.load_image(path))
    assert loaded.shape == (8, 64, 3)
    np.testing.assert_allclose(loaded[0, :, 0], np.rint(arr[0] / 257.0), atol=1)
    assert loaded[0, 32, 0] not in (0, 255)  # mid-grey stays mid-grey


def test_exif_rotation_is_applied(tmp_path: Path):
    img = _photo(60, 20, 9)  # landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    loaded = Encoder.load_image(path)
    assert loaded.size == (20, 60)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"this is a text file, not a photo\n" * 10, "not a recognised image"),
        ("random.png", bytes(range(256)) * 4, "not a recognised image"),
    ],
)
def test_unloadable_files_raise_image_load_error(tmp_path: Path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        Encoder.load_image(path)
    assert info.value.path == str(path) and reason in info.value.reason
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_image(enc: Encoder, tmp_path: Path):
    buf = io.BytesIO()
    _photo(200, 150, 3).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        enc.encode_images([path])
    assert info.value.path == str(path)
    png = io.BytesIO()
    _photo(200, 150, 3).save(png, "PNG")
    ppath = tmp_path / "cut.png"
    ppath.write_bytes(png.getvalue()[:300])
    with pytest.raises(ImageLoadError, match="truncated|corrupt"):
        Encoder.load_image(ppath)


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(ImageLoadError, match="file not found"):
        Encoder.load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="is a directory"):
        Encoder.load_image(tmp_path)


def test_decompression_bomb(tmp_path: Path, tiny_bundle: Path):
    # a real bomb: 14,000 x 14,000 bilevel pixels (196 Mpx) in a tiny PNG
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageLoadError, match="too large") as info:
        Encoder.load_image(bomb)
    assert "decompression bomb" in info.value.reason
    # the limit is an option of the Encoder
    small = _save(_photo(100, 100), tmp_path / "ok.png")
    strict = Encoder(tiny_bundle, max_pixels=5_000)
    with pytest.raises(ImageLoadError, match="too large"):
        strict.encode_images([small])


# ------------------------------------------------------------------------------------ the bundle


def test_altered_file_is_refused(tiny_bundle: Path, tmp_path: Path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "text.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "text.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"text\.onnx.*sha256"):
        Encoder(bad)
    Encoder(bad, verify=False)  # checksums skipped on request


def test_missing_file_is_refused(tiny_bundle: Path, tmp_path: Path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing tokenizer.json"):
        Encoder(bad)
    with pytest.raises(BundleError, match="no leanclip.json"):
        Encoder(tmp_path)


def test_options_threads_and_providers(tiny_bundle: Path):
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        Encoder(tiny_bundle, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="threads"):
        Encoder(tiny_bundle, threads=0)
    a = Encoder(tiny_bundle, threads=2, providers=["CPUExecutionProvider"]).encode_text(["x"])
    b = Encoder(tiny_bundle, threads=1).encode_text(["x"])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_spin_option_reaches_both_sessions(tiny_bundle: Path):
    key = "session.intra_op.allow_spinning"
    for spin, want in ((False, "0"), (True, "1")):
        enc = Encoder(tiny_bundle, spin=spin).load()
        for which in ("text", "image"):
            assert enc._session(which).get_session_options().get_session_config_entry(key) == want
    assert Encoder(tiny_bundle).spin is False  # the default: see the class docstring


def test_int8_bundle_agrees_with_fp32(tiny_bundle: Path, tiny_bundle_int8: Path):
    e32, e8 = Encoder(tiny_bundle), Encoder(tiny_bundle_int8)
    assert e8.manifest.precision == "int8" and e8.model_id != e32.model_id
    assert (tiny_bundle_int8 / "text.onnx").stat().st_size < 0.5 * (tiny_bundle / "text.onnx").stat().st_size
    assert _cos(e8.encode_text(TEXTS), e32.encode_text(TEXTS)).min() > 0.99
    imgs = [_photo(48, 40, s) for s in range(3)]
    assert _cos(e8.encode_images(imgs), e32.encode_images(imgs)).min() > 0.99


def test_encoder_never_imports_torch(tiny_bundle: Path, tmp_path: Path):
    img = _save(_photo(40, 30), tmp_path / "x.png")
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            BLOCKED = ("torch", "torchvision", "open_clip", "timm", "training")
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError("blocked import of " + name)
                return None
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(ROOT / "python")!r})
        import leanclip
        enc = leanclip.Encoder({str(tiny_bundle)!r})
        t = enc.encode_text(["a dog", ""])
        i = enc.encode_images([{str(img)!r}])
        assert t.shape == (2, 32) and i.shape == (1, 32)
        bad = [m for m in sys.modules if m.split(".")[0] in Block.BLOCKED]
        assert not bad, bad
        print("OK")
        """
    )
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-2000:]


# ----------------------------------------------------- issue 14: degenerate and thin images


def test_zero_pixel_image_is_a_clear_error(enc: Encoder):
    for size in [(0, 0), (0, 10), (10, 0)]:
        with pytest.raises(ImageLoadError, match=r"images\[1\].*no pixels") as info:
            enc.encode_images([_photo(8, 8), Image.new("RGB", size)])  # used to be ZeroDivisionError
        assert isinstance(info.value, ValueError)
        with pytest.raises(ImageLoadError, match="no pixels"):
            preprocess_image(Image.new("RGB", size), 32, [0.5] * 3, [0.5] * 3)


def test_text_that_is_not_utf8_is_a_value_error(enc: Encoder):
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid UTF-8"):
        enc.encode_text(["fine", "caf" + "\udce9"])


def test_thin_strip_file_is_refused_with_a_reason(tmp_path: Path, enc: Encoder):
    strip = _save(Image.new("RGB", (1, 6000), (200, 0, 0)), tmp_path / "strip.png")
    assert strip.stat().st_size < 200
    with pytest.raises(ImageLoadError, match="aspect ratio of 1x6000") as info:
        enc.encode_images([strip])
    assert info.value.path == str(strip)
    ok = _save(_photo(40, 30), tmp_path / "ok.png")  # an ordinary photo is not affected
    assert enc.encode_images([ok]).shape == (1, 32)


_PEAK_PROBE = r"""
import json, resource, sys
import numpy as np
from PIL import Image
from leanclip.encoder import preprocess_image
mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
preprocess_image(Image.new("RGB", (300, 200)), 224, mean, std)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shapes = [(1, 6000), (6000, 1), (2, 40000), (40000, 3)]
outs = [preprocess_image(Image.new("RGB", s, (200, 10, 10)), 224, mean, std) for s in shapes]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "after_kb": after, "shapes": [list(o.shape) for o in outs],
                  "finite": all(bool(np.isfinite(o).all()) for o in outs)}))
"""


def test_thin_strip_preprocessing_keeps_memory_flat():
    """preprocess_image of a 1 x 6000 image used to resize it to 224 x 1,344,000 first (about
    0.9 GB); a 2 x 40000 one to 224 x 4,480,000 (3 GB). Now only the center crop is computed."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["shapes"] == [[3, 224, 224]] * 4 and r["finite"]
    growth_mb = (r["after_kb"] - r["before_kb"]) / 1024
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.0f} MB"
