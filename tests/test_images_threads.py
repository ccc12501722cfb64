"""Decoding photos from many threads at once (the gallery's ``--decode-threads`` pool, the
server's thumbnails) leaves the process's warning filters as they were, and Pillow's
DecompressionBombWarning stays silent inside leanclip's decodes only (leanclip applies its own
``max_pixels``), while Pillow's DecompressionBombError is still reported as an ImageLoadError.

The defect these guard against: ``warnings.catch_warnings()`` around each decode saves and
restores the process-global filter list, so with several threads one thread's exit restored a
list another thread had changed: an "ignore" filter stayed in force, or the user's filters were
lost.
"""

from __future__ import annotations

import io
import sys
import threading
import warnings
from pathlib import Path

import pytest
from PIL import Image

from leanclip.images import ImageLoadError, decode_image, decode_thumbnail
from tests._fixtures_gallery import COLORS, ColorEncoder, make_photo


def _png(side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _decode_from_threads(data: bytes, threads: int = 8, rounds: int = 150) -> list[BaseException]:
    """Decode ``data`` ``rounds`` times in each of ``threads`` threads started together; the
    exceptions raised (none expected)."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            barrier.wait()
            for i in range(rounds):
                if (i + k) % 2:
                    img = decode_image(io.BytesIO(data), "mem.png", reduce_for=8)
                else:
                    img = decode_thumbnail(io.BytesIO(data), "mem.png", 8)
                assert img.mode == "RGB"
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows every run
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(old)
    return errors


def test_concurrent_decodes_leave_the_warning_filters_as_they_were():
    data = _png()
    with warnings.catch_warnings():  # this test's own filters, restored after it
        # the user's own filter, added before the run: it must survive, first in the list
        warnings.filterwarnings("error", message="leanclip test: the user's filter")
        before = list(warnings.filters)
        errors = _decode_from_threads(data)
        after = list(warnings.filters)
    assert errors == []
    assert after == before, (
        f"{len(after)} filters after the run, {len(before)} before; "
        f"added: {[f for f in after if f not in before][:3]}, lost: {[f for f in before if f not in after][:3]}"
    )


def test_gallery_update_on_a_decode_pool_leaves_the_warning_filters_as_they_were(tmp_path: Path):
    from leanclip.gallery import Gallery

    colors = list(COLORS.values())
    for i in range(40):
        make_photo(tmp_path / "photos" / f"p{i:02d}.jpg", colors[i % len(colors)], seed=i, size=(160, 120))
    old = sys.getswitchinterval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="leanclip test: the user's filter")
        before = list(warnings.filters)
        g = Gallery(tmp_path / "photos", store=tmp_path / "store", model=ColorEncoder(), decode_threads=4)
        sys.setswitchinterval(1e-6)
        try:
            summary = g.update()
        finally:
            sys.setswitchinterval(old)
            g.close()
        after = list(warnings.filters)
    assert (summary.added, summary.failed) == (40, 0)
    assert after == before, f"added: {[f for f in after if f not in before][:3]}"


class _WatchedFile(io.BytesIO):
    """An in-memory file that notes the warning filters each time Pillow reads it, i.e. from
    inside a decode."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.seen: list[list[object]] = []

    def read(self, size: int | None = -1) -> bytes:
        self.seen.append(list(warnings.filters))
        return super().read(size)


def test_decodes_do_not_touch_the_warning_filters_even_briefly():
    """While a decode runs (seen from Pillow's reads of the file), the filter list is the one
    before it: a decode changes nothing global that another thread (or the user) could see."""
    before = list(warnings.filters)
    for decode in (decode_image, lambda f, w: decode_thumbnail(f, w, 8)):
        f = _WatchedFile(_png())
        decode(f, "mem.png")
        assert f.seen and all(seen == before for seen in f.seen), "the filters changed inside a decode"


@pytest.fixture
def small_pillow_limit(monkeypatch):
    """Pillow's own limit lowered to 1,000 pixels: it warns above that, raises above 2,000."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    return 1_000


def test_pillow_warning_is_silent_inside_decodes_and_kept_outside(small_pillow_limit):
    data = _png(40)  # 1,600 pixels: above Pillow's limit, below twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = decode_image(io.BytesIO(data), "mem.png")
        thumb = decode_thumbnail(io.BytesIO(data), "mem.png", 16)
    assert img.size == (40, 40) and max(thumb.size) == 16
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    # Pillow outside leanclip's decodes is unchanged: it still warns
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(data)).close()


def test_user_error_filter_does_not_break_decodes(small_pillow_limit):
    """A user running with DecompressionBombWarning as an error (``-W error``) still gets the
    image: the warning is not leanclip's limit."""
    data = _png(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert decode_image(io.BytesIO(data), "mem.png").size == (40, 40)


def test_pillow_error_above_twice_its_limit_is_an_image_load_error(small_pillow_limit):
    data = _png(50)  # 2,500 pixels: above twice Pillow's limit
    for decode in (decode_image, lambda f, w: decode_thumbnail(f, w, 16)):
        with pytest.raises(ImageLoadError) as info:
            decode(io.BytesIO(data), "mem.png")
        assert info.value.path == "mem.png"
        assert "possible decompression bomb" in info.value.reason
        assert "2000 pixels" in info.value.reason  # Pillow's own message, kept as before


def test_own_max_pixels_still_applies_first(small_pillow_limit):
    data = _png(40)
    with pytest.raises(ImageLoadError) as info:
        decode_image(io.BytesIO(data), "mem.png", max_pixels=1_500)
    assert "declares 40x40 pixels, more than the limit of 1,500" in info.value.reason
