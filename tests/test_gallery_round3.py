"""Issue 25 (hardening, round 3) for the gallery: each test failed on the code before it.

Failed photos are retried when the model changes (item 6).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from leanclip.gallery import Gallery
from tests._fixtures_gallery import ColorEncoder, make_folder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    return root


class BrokenEncoder(ColorEncoder):
    """A model that loads but cannot encode any image."""

    def __init__(self) -> None:
        super().__init__("broken-v1")

    def encode_images(self, images, batch_size=32):  # type: ignore[no-untyped-def]
        raise RuntimeError("this model cannot run")


def test_model_change_retries_the_photos_the_old_model_failed(folder: Path) -> None:
    s = Gallery(folder, model=BrokenEncoder()).update()
    assert (s.failed, s.encoded) == (8, 0)
    assert Gallery(folder, model=BrokenEncoder()).info()["failed"] == 8
    enc = ColorEncoder()
    g = Gallery(folder, model=enc)
    s2 = g.update()
    assert "model changed" in s2.recovered
    assert (s2.encoded, s2.failed, enc.images_encoded) == (8, 0, 8)
    info = g.info()
    assert (info["ok"], info["failed"], info["pending"]) == (8, 0, 0)
    assert {h.name for h in g.search("red", k=2)} == {"red/red_0.jpg", "red/red_1.jpg"}
    missing, extra = g.check()
    assert missing == [] and extra == []
    # and the next run has nothing left to do
    s3 = g.update()
    assert (s3.encoded, s3.unchanged) == (0, 8)


def test_model_change_keeps_failing_what_no_model_can_read(folder: Path) -> None:
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "dir.jpg").mkdir()
    g1 = Gallery(folder, model=ColorEncoder())
    s = g1.update()
    assert s.failed == 2 and s.encoded == 8
    g2 = Gallery(folder, model=ColorEncoder("color-v2"))
    s2 = g2.update()
    assert s2.encoded == 8 and s2.failed == 2
    assert set(dict(g2.failures())) == {"broken.jpg", "dir.jpg"}
    assert g2.info()["failed"] == 2


def test_raising_the_precision_re_encodes(folder: Path) -> None:
    enc = ColorEncoder()
    g = Gallery(folder, model=enc)
    g.update()
    exact = {h.name: h.score for h in g.search("red", k=8)}
    s = Gallery(folder, model=enc, dtype="i8").update()
    assert s.encoded == 0 and enc.images_encoded == 8  # lowering converts the stored vectors
    coarse = {h.name: h.score for h in Gallery(folder, model=enc).search("red", k=8)}
    assert max(abs(coarse[n] - exact[n]) for n in exact) > 1e-4  # i8 is lossy
    for finer in ("f16", "f32"):
        s = Gallery(folder, model=enc, dtype=finer).update()
        assert s.encoded == 8 and "precision raised" in s.recovered, s
        assert Gallery(folder, model=enc).info()["ok"] == 8
    assert enc.images_encoded == 24
    again = {h.name: h.score for h in Gallery(folder, model=enc).search("red", k=8)}
    assert again.keys() == exact.keys() and max(abs(again[n] - exact[n]) for n in exact) < 1e-6
    assert Gallery(folder, model=enc).update().encoded == 0  # and it stays f32


def test_a_model_that_fails_its_self_check_stops_the_update(folder: Path) -> None:
    from leanclip.bundle import BundleError

    Gallery(folder, model=ColorEncoder()).update()

    class CannotRun(ColorEncoder):
        def encode_images(self, images, batch_size=32):  # type: ignore[no-untyped-def]
            raise BundleError("image.onnx: the model cannot run what leanclip.json declares (image.size 223)")

    with pytest.raises(BundleError, match="image.size 223"):
        Gallery(folder, model=CannotRun("broken-v2")).update()
    # no photo is recorded as failed (none is at fault): all wait for a model that runs
    info = Gallery(folder, model=ColorEncoder()).info()
    assert (info["failed"], info["pending"]) == (0, 8)
    s = Gallery(folder, model=ColorEncoder()).update()
    assert (s.encoded, s.failed) == (8, 0)
