"""Capture dates of photos, and the date bounds of ``--after`` / ``--before``.

A photo's date is its *local wall-clock time*: what the camera's clock showed (EXIF
``DateTimeOriginal``, else ``DateTimeDigitized``), or, without a usable EXIF date, the file's
modification time in this machine's time zone. It is stored as seconds since 1970-01-01 00:00
*read as UTC* ("wall seconds"), so that ``--after 2024-07`` means July 2024 on the calendar of
the place the photo was taken, whatever the time zone of the machine that searches. The EXIF
offset (``OffsetTimeOriginal``, e.g. ``+02:00``) is kept next to it when the camera wrote one.

Bad EXIF is a fallback, never a failure: a missing, empty, unparsable, all-zero or absurd date
(before 1826, the first photograph, or more than a day after now) falls back to the file's
modification time, and the source says which was used.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple

__all__ = ["Captured", "capture_time", "exif_time", "parse_bound", "format_wall", "MIN_YEAR"]

MIN_YEAR = 1826  # the first surviving photograph; anything earlier is a broken clock
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_DATETIME_DIGITIZED = 0x9004
_OFFSET_ORIGINAL = 0x9011
_OFFSET_DIGITIZED = 0x9012
_EXIF_RE = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"^\s*([+-])(\d{2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Captured:
    """When a photo was taken: local wall-clock seconds (see the module docstring), the source
    ("exif" or "mtime") and the UTC offset in minutes when the camera recorded it."""

    wall: int
    source: str
    offset_min: Optional[int] = None


def _latest_wall() -> int:
    return int(time.time()) + 14 * 3600 + 86400  # now in the easternmost zone, plus a day


def _text(value: Any) -> Optional[str]:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "").strip()


def _parse_exif_datetime(value: Any) -> Optional[int]:
    """Wall seconds of an EXIF ``YYYY:MM:DD HH:MM:SS``, or None when it is not a sane date."""
    text = _text(value)
    m = _EXIF_RE.match(text or "")
    if not m:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups())
    try:
        when = _dt.datetime(y, mo, d, h, mi, min(s, 59))
    except ValueError:  # month 13, day 0, hour 25, year 0 ...
        return None
    if y < MIN_YEAR:
        return None
    wall = calendar.timegm(when.timetuple())
    return wall if wall <= _latest_wall() else None


def _parse_offset(value: Any) -> Optional[int]:
    m = _OFFSET_RE.match(_text(value) or "")
    if not m:
        return None
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    if minutes > 14 * 60:
        return None
    return -minutes if m.group(1) == "-" else minutes


def exif_time(exif: Any) -> Optional[Captured]:
    """The capture time recorded in a Pillow ``Image.Exif``, or None without a usable one."""
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is a fallback, never a failure
        return None
    for tag, offset_tag in ((_DATETIME_ORIGINAL, _OFFSET_ORIGINAL), (_DATETIME_DIGITIZED, _OFFSET_DIGITIZED)):
        wall = _parse_exif_datetime(sub.get(tag))
        if wall is not None:
            return Captured(wall, "exif", _parse_offset(sub.get(offset_tag)))
    return None


def _mtime_wall(st: os.stat_result) -> int:
    local = time.localtime(st.st_mtime)
    return calendar.timegm(local[:6] + (0, 0, 0))


def capture_time(path: Any, st: Optional[os.stat_result] = None) -> Captured:
    """When the photo at ``path`` was taken: its EXIF date, else its modification time. Reads
    the file's header only (no pixels are decoded); never raises for a bad or missing EXIF
    block or an unreadable file (the mtime is used, or 0 when even that is unknown)."""
    from PIL import Image

    from leanclip.images import register_formats

    register_formats()
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            warnings.simplefilter("ignore")  # Pillow warns of corrupt EXIF: the fallback covers it
            found = exif_time(img.getexif())
        if found is not None:
            return found
    except Exception:  # noqa: BLE001 - not an image Pillow can read, bad EXIF: use the mtime
        pass
    try:
        return Captured(_mtime_wall(st or os.stat(path)), "mtime")
    except (OSError, ValueError, OverflowError):
        return Captured(0, "mtime")


_BOUND_RE = re.compile(r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?$")


def parse_bound(text: str) -> int:
    """Wall seconds at the *start* of a date given as ``2024``, ``2024-07``, ``2024-07-14`` or
    ``2024-07-14T18:30[:05]``. ``--after X`` keeps photos taken at or after the start of X,
    ``--before X`` those taken before it (so ``--after 2024-07 --before 2024-08`` is July).
    ValueError with the reason for anything else."""
    m = _BOUND_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a date: use YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM")
    parts = [int(g) if g is not None else None for g in m.groups()]
    y, mo, d, h, mi, s = parts
    try:
        when = _dt.datetime(y or 1, mo or 1, d or 1, h or 0, mi or 0, s or 0)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date ({exc})") from None
    return calendar.timegm(when.timetuple())


def format_wall(wall: Optional[int]) -> str:
    """``YYYY-MM-DD HH:MM`` of wall seconds ('' for None)."""
    if wall is None:
        return ""
    try:
        return _dt.datetime.fromtimestamp(int(wall), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return ""


def bounds(after: Optional[str], before: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """``(after, before)`` wall seconds of the two options (None where not given)."""
    return (parse_bound(after) if after else None, parse_bound(before) if before else None)
