"""leanclip: small, fast CLIP-style text-to-image search.

The public API is written in Python over the private compiled module ``leanclip._engine``.
Heavy or optional parts (the ONNX encoder, the gallery, the approximate index) are imported
lazily so that ``import leanclip`` stays fast and needs only numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Index": "leanclip._engine",
    "IVFIndex": "leanclip._engine",
    "IndexFileError": "leanclip.errors",
    "mine_hard_negatives": "leanclip._engine",
    "hard_negative_ids": "leanclip.mining",
    "Encoder": "leanclip.encoder",
    "EncodeError": "leanclip.encoder",
    "ImageLoadError": "leanclip.images",
    "LeanclipError": "leanclip.errors",
    "BundleError": "leanclip.bundle",
    "Gallery": "leanclip.gallery",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover - the names type checkers see (``X as X``: re-exported)
    from leanclip._engine import Index as Index
    from leanclip._engine import IVFIndex as IVFIndex
    from leanclip._engine import mine_hard_negatives as mine_hard_negatives
    from leanclip.bundle import BundleError as BundleError
    from leanclip.encoder import EncodeError as EncodeError
    from leanclip.encoder import Encoder as Encoder
    from leanclip.errors import IndexFileError as IndexFileError
    from leanclip.errors import LeanclipError as LeanclipError
    from leanclip.gallery import Gallery as Gallery
    from leanclip.images import ImageLoadError as ImageLoadError
    from leanclip.mining import hard_negative_ids as hard_negative_ids


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'leanclip' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
