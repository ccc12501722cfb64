"""The root of leanclip's own error classes.

Every error class leanclip defines derives from :class:`LeanclipError` (``tests/test_api_surface.py``
finds them all): refused files, bundles, models, images, galleries, missing optional packages.
Catch it to handle anything the library refuses *about its inputs' content or state*; each
subclass keeps the built-in base it always had (``BundleError`` is still a ``ValueError``, and so
on), so existing ``except ValueError`` code keeps working.

A bad *argument* is the built-in exception Python code raises anywhere, not a LeanclipError: the
engine answers a wrong shape, NaN, a bad ``k`` or an unknown metric with ``ValueError``, a key
already present (``add``) or absent (``get``) with ``KeyError``, a write to a memory-mapped index
with ``RuntimeError``, and a missing file with ``FileNotFoundError``.
"""

from __future__ import annotations


class LeanclipError(Exception):
    """Base class of every error class leanclip defines (argument errors are built-in ones)."""


class IndexFileError(LeanclipError):
    """A bad, truncated, corrupted, foreign or other-version index file, or a memory-mapped
    index file that changed (was truncated, replaced or rewritten) after it was opened.

    Raised by the engine (``leanclip._engine`` imports this class, so
    ``leanclip.IndexFileError is leanclip._engine.IndexFileError``).
    """


class ModelError(LeanclipError):
    """A model cannot be found, built or fetched; the message says what to do (``leanclip.registry``)."""
