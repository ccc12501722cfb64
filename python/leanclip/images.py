"""The one image loader: every part of leanclip that opens a photo file (the encoder, the
gallery, the server's thumbnails, and training's data loading) goes through :func:`load_image`.

Rules (public: ``from leanclip.images import load_image, ImageLoadError``):

* Only regular files are opened: a missing file, a directory, a device or a FIFO, or an empty
  file is refused before Pillow sees it.
* The size a file *declares* is checked before any pixel is decoded: more than ``max_pixels``
  (a decompression bomb), no pixels at all (0 x N), or an aspect ratio beyond
  ``MAX_ASPECT_RATIO`` (a 1 x 6000 strip has nothing to show a square model, and resizing its
  short side up to the model's size would cost gigabytes) is an :class:`ImageLoadError` with
  the reason.
* With ``reduce_for=S`` the decode is bounded by the output size: JPEGs are decoded at reduced
  scale (``Image.draft``), HEIC/HEIF files from their embedded thumbnail when one of at least
  ``S`` x ``S`` is a scaled copy of the image (pillow-heif's ``draft``; a phone's 12 Mpx HEIC
  decodes ~40x slower than a JPEG at 1/8 scale), and large images shrunk by an integer factor
  (``Image.reduce``) so the short side stays 2-4x ``S``; the caller's exact resize does the rest. Without it the image is
  decoded at full size (what open_clip sees).
* The image is EXIF-rotated and converted to 8-bit RGB by :func:`to_rgb`: 16- and 32-bit integer
  grayscale is scaled from its full range, float images are clipped to [0, 1], palette images
  with transparency go through RGBA, alpha is dropped (as open_clip does). The first frame of an
  animation is used.
* Every failure is an :class:`ImageLoadError` whose ``path`` and ``reason`` say which file and
  why; the reason is never empty.
* Phone formats: HEIC/HEIF decode through pillow-heif, AVIF through Pillow's own plugin (Pillow
  11.3 and later); both come with ``pip install 'leanclip[heif]'``. They pass the same checks as
  any other format. A HEIF or AVIF file that the installed packages cannot open fails with a
  reason naming that extra (:func:`register_formats`, :data:`PHONE_EXTENSIONS`).
"""

from __future__ import annotations

import contextlib
import os
import stat
from contextvars import ContextVar
from struct import error as struct_error
from typing import Any, BinaryIO, Callable, ContextManager, Iterator, Optional, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

from leanclip._fs import PathLike
from leanclip.errors import LeanclipError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PHONE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "ImageLoadError",
    "check_dimensions",
    "decode_image",
    "decode_thumbnail",
    "decoded_bytes",
    "load_image",
    "register_formats",
    "to_rgb",
]

# Larger images are refused before decoding (decompression bombs): 64 Mpx decodes to ~192 MB of
# RGB, which bounds memory. Pillow's global settings stay as they are (its own limit is ~179 Mpx).
DEFAULT_MAX_PIXELS = 64_000_000
# Longest side / shortest side beyond which an image is refused (panoramas are up to ~12:1).
MAX_ASPECT_RATIO = 50


# Pillow warns (DecompressionBombWarning) from inside Image.open for images above its limit
# (~89 Mpx) and raises above twice it. leanclip applies max_pixels itself, so in its own decodes
# only Pillow's error stays. Not with warnings.catch_warnings(): that swaps the process-wide
# filter list on every decode, which is not thread-safe (the gallery decodes on a pool: an
# "ignore" could stay in force after a run, or the user's filters be lost). Instead Pillow's
# check is wrapped once, and a context variable (one per thread) says "inside a leanclip
# decode"; everywhere else Pillow checks, and warns, as it always does.
# A Pillow without this private hook only costs the warning, never the import.
_IN_OWN_DECODE: ContextVar[bool] = ContextVar("leanclip_in_own_decode", default=False)
_pillow_bomb_check = getattr(Image, "_decompression_bomb_check", None)


def _bomb_check(size: tuple[int, int], **kwargs: Any) -> None:
    """Pillow's decompression-bomb check, without its warning inside leanclip's decodes."""
    limit = Image.MAX_IMAGE_PIXELS
    if _IN_OWN_DECODE.get() and limit is not None and max(1, size[0]) * max(1, size[1]) <= 2 * limit:
        return  # Pillow would only warn (its formula): max_pixels is leanclip's limit here
    assert _pillow_bomb_check is not None  # installed below only when Pillow has the hook
    _pillow_bomb_check(size, **kwargs)


if _pillow_bomb_check is not None:
    Image._decompression_bomb_check = _bomb_check


# HEIF (HEIC) and AVIF: the formats phones save, opened by pillow-heif / Pillow's AVIF plugin
PHONE_EXTENSIONS = frozenset({".heic", ".heif", ".hif", ".avif"})
# ISO base media "ftyp" brands (bytes 8-12 of the file) of HEIF stills and of AVIF
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_formats_registered = False


def register_formats() -> None:
    """Register pillow-heif's HEIF opener with Pillow (once; a no-op when it is not installed).
    AVIF needs nothing: Pillow 11.3 and later open it themselves."""
    global _formats_registered
    if _formats_registered:
        return
    _formats_registered = True
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


def _missing_plugin(source: Any) -> Optional[str]:
    """Why a file Pillow did not recognise cannot be read, when it is a HEIF or AVIF file that
    the installed packages cannot open (the reason names the extra), else None."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
            head = source.read(12)
        else:
            with open(source, "rb") as fh:
                head = fh.read(12)
    except (OSError, ValueError):
        return None
    if head[4:8] != b"ftyp":
        return None
    brand = head[8:12]
    if brand in _HEIF_BRANDS:
        if "HEIF" in Image.ID:
            return "corrupt HEIC/HEIF file (its header or image data cannot be read)"
        return "HEIC/HEIF needs pillow-heif (not installed): pip install 'leanclip[heif]'"
    if brand in _AVIF_BRANDS:
        if "AVIF" in Image.ID:
            return "corrupt AVIF file (its header or image data cannot be read)"
        return "AVIF needs Pillow 11.3 or later with AVIF support: pip install 'leanclip[heif]'"
    return None


class ImageLoadError(LeanclipError, ValueError):
    """An image file could not be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Any, reason: str) -> None:
        self.path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        self.reason = reason or "unknown error"
        super().__init__(f"cannot load image {self.path}: {self.reason}")


def check_dimensions(where: Any, w: int, h: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse a (declared) size of ``w`` x ``h`` with the reason: no pixels, too many pixels,
    or an absurd aspect ratio. ``where`` names the image in the error."""
    if w <= 0 or h <= 0:
        raise ImageLoadError(where, f"image has no pixels ({w} x {h})")
    if w * h > max_pixels:
        raise ImageLoadError(
            where,
            f"image too large: declares {w}x{h} pixels, more than the limit of {max_pixels:,} "
            "(possible decompression bomb); not decoded",
        )
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageLoadError(
            where,
            f"aspect ratio of {w}x{h} is beyond {MAX_ASPECT_RATIO}:1; a strip this thin is not a photo "
            "(refused before decoding)",
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB uint8 from any Pillow mode (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr8 = np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0
        elif mode == "I":
            # 32-bit container: values beyond 16 bits are clipped, 16-bit data is scaled
            arr8 = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
        else:
            arr8 = arr.astype(np.float64) / 257.0  # 65535 -> 255
        gray = Image.fromarray(np.rint(arr8).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when going P -> RGB with byte transparency
    return img.convert("RGB")


_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})  # modes Image.reduce takes
_TURNED = range(2, 9)  # EXIF orientations that ImageOps.exif_transpose turns or mirrors


def _reduce(img: Image.Image, size: int) -> Image.Image:
    """Shrink by an integer factor so the short side stays at least 2x ``size``."""
    short = min(img.size)
    return img.reduce(short // (2 * size)) if short >= 4 * size else img


def load_image(
    path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_for: Optional[int] = None
) -> Image.Image:
    """An EXIF-rotated 8-bit RGB image, or :class:`ImageLoadError` naming the file and reason.

    ``reduce_for``: the output size the caller will resize to; decoding then stops at a short
    side of 2-4x this (see the module docstring). The caller owns (and should close) the image.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except (OSError, ValueError) as exc:
        raise ImageLoadError(path, f"cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return decode_image(path, path, max_pixels=max_pixels, reduce_for=reduce_for)


def decode_image(
    source: Union[PathLike, BinaryIO],
    where: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_for: Optional[int] = None,
) -> Image.Image:
    """:func:`load_image`'s decoding, from a path or an open binary file (bytes already read
    and checked by the caller, e.g. the server's verified file); ``where`` names it in errors.
    The file checks (regular, not empty) are the caller's."""
    with _decoding(source, where), Image.open(source) as img:
        check_dimensions(where, *img.size, max_pixels=max_pixels)
        if reduce_for:
            # JPEG: decoded at 1/2, 1/4 or 1/8 scale; HEIF: the smallest embedded thumbnail of
            # at least this size that is a scaled copy of the image (what phones store), else
            # the image (pillow-heif's draft: 1.9 here; a version without it decodes in full);
            # other formats ignore it
            img.draft("RGB", (reduce_for, reduce_for))
        img.load()
        out = _upright(img)
        if reduce_for and out.mode in _REDUCIBLE:
            out = _reduce(out, reduce_for)  # before converting: the copy made is small
        out = to_rgb(out)
        if reduce_for:
            out = _reduce(out, reduce_for)
        # the caller gets an image of its own, not the opened file's (which holds the file's
        # decoder state); copied only when nothing above made a new one
        return img.copy() if out is img else out


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says, or ``img`` itself when it is already
    upright: ``ImageOps.exif_transpose`` would copy it then (a 12 Mpx photo decoded in full,
    as HEIC and AVIF are: 48 MB and ~30 ms of CPU for nothing)."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) not in _TURNED:
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the pixels as stored
        return img


def decoded_bytes(img: Image.Image) -> int:
    """The memory Pillow needs to hold ``img``'s pixels at its current (possibly drafted) size:
    1 byte a pixel for 1/L/P, 2 for 16-bit, 4 for the rest (Pillow keeps RGB as 32-bit pixels)."""
    mode = img.mode
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return img.width * img.height * per_pixel


def decode_thumbnail(
    source: Union[PathLike, BinaryIO],
    where: Any,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reserve: Optional[Callable[[int], ContextManager[Any]]] = None,
) -> Image.Image:
    """An EXIF-rotated RGB preview that fits in ``size`` x ``size`` (aspect kept), decoded with
    as little memory as Pillow allows: a JPEG at reduced scale (``draft``: down to 1/8 a side),
    any other format once at full size and shrunk by an integer factor (``reduce``) before any
    conversion or rotation, so only the small image is ever copied. The declared size is
    checked first (``max_pixels``), so the decode is bounded by ``max_pixels`` x 4 bytes.

    ``reserve(nbytes)``: a context manager entered around the decode with the bytes it needs
    (:func:`decoded_bytes`, known before any pixel is decoded): the caller's way to bound how
    much memory concurrent decodes hold (the server's thumbnail budget)."""
    with _decoding(source, where), _binary(source) as fh:
        img = Image.open(fh)  # not a with block: the pixels are freed below, by dropping img
        check_dimensions(where, *img.size, max_pixels=max_pixels)
        img.draft("RGB", (size, size))  # JPEG only (others ignore it)
        with reserve(decoded_bytes(img)) if reserve is not None else contextlib.nullcontext():
            img.load()
            factor = max(img.size) // (2 * size)
            if factor < 2:
                small = img.copy()
            elif img.mode in _REDUCIBLE:
                small = img.reduce(factor)
            else:  # palette and other modes: a nearest-pixel shrink (reduce takes none)
                w, h = img.size
                small = img.resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.NEAREST)
            del img  # the full-size pixels are freed here, inside the reservation
    try:
        small = ImageOps.exif_transpose(small)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the pixels as stored
        pass
    small = to_rgb(small)
    small.thumbnail((size, size))
    return small


@contextlib.contextmanager
def _binary(source: Union[PathLike, BinaryIO]) -> Iterator[BinaryIO]:
    """An open binary file: ``source`` itself, or the file at that path (closed after)."""
    if hasattr(source, "read"):
        yield source  # type: ignore[misc]
    else:
        with open(source, "rb") as fh:  # type: ignore[arg-type]
            yield fh


@contextlib.contextmanager
def _decoding(source: Any, where: Any) -> Iterator[None]:
    """Pillow's failures while opening and decoding ``source`` as :class:`ImageLoadError`."""
    register_formats()
    own = _IN_OWN_DECODE.set(True)
    try:
        yield
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(where, f"image too large (possible decompression bomb): {exc}") from None
    except Image.UnidentifiedImageError:
        reason = _missing_plugin(source) or "not a recognised image format (corrupt or wrong extension)"
        raise ImageLoadError(where, reason) from None
    except PermissionError:
        raise ImageLoadError(where, "permission denied") from None
    except MemoryError:
        raise ImageLoadError(where, "out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"),
        # SyntaxError (bad PNG chunks), ValueError or struct.error
        raise ImageLoadError(
            where,
            f"truncated or corrupt image data ({type(exc).__name__}: {str(exc).strip() or 'no detail'})",
        ) from None
    finally:
        _IN_OWN_DECODE.reset(own)
