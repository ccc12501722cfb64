"""Capture dates (leanclip.dates): EXIF first, the file's mtime as the fallback for anything
absent, bad or absurd (never a failure), and the --after / --before bounds."""

from __future__ import annotations

import calendar
import datetime as dt
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from leanclip.dates import capture_time, format_wall, parse_bound


def _photo(path: Path, original=None, offset=None, digitized=None, fmt=None) -> Path:
    from leanclip.images import register_formats

    register_formats()
    ex = Image.Exif()
    sub = ex.get_ifd(0x8769)
    if original is not None:
        sub[0x9003] = original
    if offset is not None:
        sub[0x9011] = offset
    if digitized is not None:
        sub[0x9004] = digitized
    Image.new("RGB", (16, 12), (200, 40, 40)).save(path, format=fmt, exif=ex.tobytes())
    return path


def _wall(*args: int) -> int:
    return calendar.timegm(dt.datetime(*args).timetuple())


def _mtime_wall(path: Path) -> int:
    return calendar.timegm(time.localtime(os.stat(path).st_mtime)[:6] + (0, 0, 0))


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("HEIF", "heic"), ("AVIF", "avif")])
def test_exif_date_and_offset_from_every_format(tmp_path, fmt, ext):
    p = _photo(tmp_path / f"a.{ext}", "2024:07:14 18:30:05", "+02:00", fmt=fmt)
    c = capture_time(p)
    assert (c.wall, c.source, c.offset_min) == (_wall(2024, 7, 14, 18, 30, 5), "exif", 120)
    assert format_wall(c.wall) == "2024-07-14 18:30"


def test_digitized_date_when_original_is_missing(tmp_path):
    c = capture_time(_photo(tmp_path / "a.jpg", digitized="2019:01:02 03:04:05", offset="-05:30"))
    assert (c.wall, c.source, c.offset_min) == (_wall(2019, 1, 2, 3, 4, 5), "exif", None)


@pytest.mark.parametrize(
    "value",
    [
        "0000:00:00 00:00:00",  # cameras write zeros for "unknown"
        "    :  :     :  :  ",
        "",
        "1700:01:01 00:00:00",  # before photography
        "2999:01:01 00:00:00",  # a clock in the far future
        "2024:13:45 25:61:00",  # month 13, hour 25
        "not a date at all",
        "2024-07",
        b"\xff\xfe\x00garbage",
    ],
)
def test_absurd_or_bad_exif_dates_fall_back_to_mtime(tmp_path, value):
    p = _photo(tmp_path / "a.jpg", value, "+99:99")
    os.utime(p, (1_600_000_000, 1_600_000_000))
    c = capture_time(p)
    assert c.source == "mtime" and c.wall == _mtime_wall(p) and c.offset_min is None


def test_no_exif_corrupt_file_and_missing_file_never_raise(tmp_path):
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(plain)
    assert capture_time(plain).source == "mtime"
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00II*\x00\x08\x00\x00\x00garbage")
    assert capture_time(junk) == capture_time(junk) and capture_time(junk).source == "mtime"
    gone = capture_time(tmp_path / "nope.jpg")
    assert (gone.wall, gone.source) == (0, "mtime")


@pytest.mark.parametrize(
    "text,expect",
    [
        ("2024", (2024, 1, 1)),
        ("2024-07", (2024, 7, 1)),
        ("2024-7", (2024, 7, 1)),
        ("2024-07-14", (2024, 7, 14)),
        ("2024-07-14T18:30", (2024, 7, 14, 18, 30)),
        (" 2024-07-14 18:30:05 ", (2024, 7, 14, 18, 30, 5)),
    ],
)
def test_parse_bound(text, expect):
    assert parse_bound(text) == _wall(*expect)


@pytest.mark.parametrize(
    "text", ["", "24", "2024-13", "2024-02-30", "July 2024", "2024/07", "2024-07-14T25:00"]
)
def test_parse_bound_refuses_with_the_reason(text):
    with pytest.raises(ValueError, match="date"):
        parse_bound(text)
