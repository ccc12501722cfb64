"""leanclip.samples: real photos copied from installed packages, with credits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from leanclip import samples


def test_credits_cover_every_source() -> None:
    assert set(samples.SAMPLE_CREDITS) == set(samples.SAMPLE_SOURCES)
    for name, credit in samples.SAMPLE_CREDITS.items():
        assert {"title", "package", "source", "license"} <= set(credit), name
        assert name.endswith((".png", ".jpg")), name


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")
def test_collect_copies_real_photos_and_credits(tmp_path: Path) -> None:
    paths = samples.collect_sample_photos(tmp_path / "photos")
    assert len(paths) >= 10  # scikit-image alone ships ten of them
    names = [p.name for p in paths]
    assert names == [n for n in samples.sample_photo_names() if n in names]  # stable order
    for path in paths:
        with Image.open(path) as im:
            im.verify()  # a real, complete image file
        with Image.open(path) as im:
            assert im.format in ("PNG", "JPEG")
            assert min(im.size) >= 256  # photographs, not thumbnails or icons
    credits = (tmp_path / "photos" / "CREDITS.md").read_text(encoding="utf-8")
    for name in names:
        assert name in credits
    assert "CC0" in credits
    # running again overwrites in place and gives the same result
    assert [p.name for p in samples.collect_sample_photos(tmp_path / "photos")] == names


def test_missing_package_is_skipped_with_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = samples.package_dir

    def fake(package: str):
        return None if package == "matplotlib" else real(package)

    monkeypatch.setattr(samples, "package_dir", fake)
    if real("skimage") is None and real("sklearn") is None:
        pytest.skip("needs scikit-image or scikit-learn")
    with pytest.warns(UserWarning, match="matplotlib"):
        paths = samples.collect_sample_photos(tmp_path)
    assert "grace_hopper.jpg" not in [p.name for p in paths]
    assert not (tmp_path / "grace_hopper.jpg").exists()


def test_no_package_at_all_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "package_dir", lambda package: None)
    from leanclip._deps import MissingDependency
    from leanclip.errors import LeanclipError

    with pytest.warns(UserWarning):
        with pytest.raises(MissingDependency) as info:
            samples.collect_sample_photos(tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, LeanclipError) and "\n" not in msg
    assert msg.startswith("leanclip demo needs the sample photos") and msg.endswith(
        "pip install 'leanclip[demo]'"
    )
