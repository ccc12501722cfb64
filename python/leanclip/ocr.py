"""Text in photos: receipts, signs, screenshots, slides (``leanclip index --ocr``).

The reader is RapidOCR on onnxruntime (``pip install 'leanclip[ocr]'``): PP-OCR detection and
recognition models shipped inside its wheel, so it runs offline. Photos are read at a bounded
size (:data:`OCR_SIDE`: the decode stops there, as for the model input), lines are returned top
to bottom, and a photo the reader chokes on yields no text rather than an error: text is an
extra, the photo stays indexed.
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional

import numpy as np
from PIL import Image

from leanclip._deps import require
from leanclip._fs import PathLike
from leanclip.images import DEFAULT_MAX_PIXELS, load_image

__all__ = ["OCR_SIDE", "TextReader", "read_text"]

OCR_SIDE = 640  # decode for this size: short side 1280-2560 px, enough for text ~10 px high
MIN_CONFIDENCE = 0.5  # lines the recogniser is less sure of are dropped
UPSCALE_BELOW = 1280  # images whose longest side is at most this are read at twice the size


class TextReader:
    """A loaded OCR engine (loading takes ~1 s; keep one per process)."""

    def __init__(self) -> None:
        mod = require("rapidocr_onnxruntime", "ocr", "reading text in photos (--ocr)")
        self._engine = mod.RapidOCR()
        self._lock = threading.Lock()

    def read_image(self, image: Any) -> str:
        """The text in a PIL image, one line per detected line, top to bottom ('' for none)."""
        image = image.convert("RGB")
        if max(image.size) <= UPSCALE_BELOW:
            # the recogniser drops the spaces between small words ("TOTAL42.50"): read small
            # images at twice the size (measured in benchmarks/bench_photos.py)
            image = image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC)
        arr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])  # RGB -> BGR, as OpenCV reads
        try:
            with self._lock:
                result, _ = self._engine(arr)
        except Exception:  # noqa: BLE001 - text is an extra: a photo the reader chokes on has none
            return ""
        lines: List[tuple] = []
        for box, text, score in result or []:
            if float(score) >= MIN_CONFIDENCE and str(text).strip():
                top = min(float(p[1]) for p in box)
                left = min(float(p[0]) for p in box)
                lines.append((top, left, str(text).strip()))
        lines.sort()
        return "\n".join(t for _, _, t in lines)

    def read(self, path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
        """The text in the photo at ``path`` (decoded by the one image loader, bounded)."""
        im = load_image(path, max_pixels=max_pixels, reduce_for=OCR_SIDE)
        try:
            return self.read_image(im)
        finally:
            im.close()


_reader: Optional[TextReader] = None


def read_text(path: PathLike) -> str:
    """The text in the photo at ``path``, with a reader shared by the process."""
    global _reader
    if _reader is None:
        _reader = TextReader()
    return _reader.read(path)
