"""What the gallery needs of a model, and what it reads from one."""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["EncoderLike", "model_image_size", "similarity_dim"]


@runtime_checkable
class EncoderLike(Protocol):
    """What the gallery needs of a model (``leanclip.Encoder`` has it)."""

    dim: int
    model_id: str

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, images: Sequence[Any]) -> np.ndarray: ...


def model_image_size(enc: Any) -> int:
    """The side of the square images the model takes (images are decoded reduced toward it)."""
    try:
        return int(enc.manifest.image.size)
    except AttributeError:
        return int(getattr(enc, "image_size", 224))


def similarity_dim(enc: Any) -> int:
    """The width of a model's image-to-image vectors; 0 when it has none."""
    if not getattr(enc, "has_similarity", False):
        return 0
    return int(getattr(enc, "similarity_dim", 0) or 0)
