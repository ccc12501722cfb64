"""The gallery's errors. Every one is a :class:`leanclip.errors.LeanclipError`."""

from __future__ import annotations

from leanclip.errors import LeanclipError

__all__ = ["GalleryError", "GalleryBusyError", "ModelMismatchError"]


class GalleryError(LeanclipError):
    """A gallery cannot be opened, updated or queried; the message says why."""


class GalleryBusyError(GalleryError):
    """Another process is updating this gallery."""


class ModelMismatchError(GalleryError):
    """The gallery was indexed with another model than the one asked for."""


class StaleSnapshot(Exception):
    """Internal: a read transaction's generation was superseded and its index file removed."""
