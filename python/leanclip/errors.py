"""One root for every error leanclip raises on purpose.

Catch :class:`LeanclipError` to handle anything the library refuses; each subclass keeps the
built-in base it always had (``BundleError`` is still a ``ValueError``, and so on), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations


class LeanclipError(Exception):
    """Base class of every error that leanclip raises on purpose."""


class IndexFileError(LeanclipError):
    """A bad, truncated, corrupted, foreign or other-version index file, or a memory-mapped
    index file that changed (was truncated, replaced or rewritten) after it was opened.

    Raised by the engine (``leanclip._engine`` imports this class, so
    ``leanclip.IndexFileError is leanclip._engine.IndexFileError``) and by ``ApproxIndex``.
    """


class ModelError(LeanclipError):
    """A model cannot be found, built or fetched; the message says what to do (``leanclip.models``)."""
