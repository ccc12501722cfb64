"""The public surface as the docs describe it: the error classes leanclip defines, found by
walking the package (not listed by hand), and the names docs/ARCHITECTURE.md promises."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest

import leanclip
from leanclip.errors import LeanclipError


def _package_modules() -> list:
    """Every module of the installed package (importing them needs the test extra's packages)."""
    names = ["leanclip"] + [m.name for m in pkgutil.walk_packages(leanclip.__path__, "leanclip.")]
    return [importlib.import_module(n) for n in names]


def _error_classes() -> dict:
    """qualified name -> class, for every exception class defined in a leanclip module."""
    found = {}
    for module in _package_modules():
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("leanclip")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_error_class_leanclip_defines_derives_from_leanclip_error() -> None:
    """What errors.py promises: each error class of the package is a LeanclipError. A class that
    never leaves the package (a signal between two functions) says so: its docstring starts with
    "Internal:"."""
    found = _error_classes()
    # the walk sees the package: errors from five different modules at least
    assert {
        "leanclip.bundle.BundleError",
        "leanclip.images.ImageLoadError",
        "leanclip.errors.IndexFileError",
        "leanclip.gallery.errors.GalleryError",
        "leanclip._deps.MissingDependency",
    } <= set(found)
    internal = {c for c in found.values() if (c.__doc__ or "").startswith("Internal:")}
    exported = {
        obj
        for m in _package_modules()
        for obj in (getattr(m, n, None) for n in getattr(m, "__all__", ()))
        if isinstance(obj, type)
    }
    assert not internal & exported, f"internal error classes exported: {internal & exported}"
    public = {n: c for n, c in found.items() if c not in internal}
    strays = sorted(n for n, c in public.items() if not issubclass(c, LeanclipError))
    assert not strays, f"error classes that are not LeanclipError: {strays}"


def test_error_classes_keep_their_builtin_bases() -> None:
    """``except ValueError`` (or ImportError, RuntimeError) code written before the root existed
    keeps catching them."""
    from leanclip._deps import MissingDependency
    from leanclip._selfcheck import ExportError
    from leanclip.bundle import BundleError
    from leanclip.gallery import GalleryBusyError, GalleryError, ModelMismatchError
    from leanclip.images import ImageLoadError

    assert issubclass(BundleError, ValueError) and issubclass(ImageLoadError, ValueError)
    assert issubclass(MissingDependency, ImportError) and issubclass(ExportError, RuntimeError)
    assert issubclass(GalleryBusyError, GalleryError) and issubclass(ModelMismatchError, GalleryError)
    assert leanclip.IndexFileError is leanclip._engine.IndexFileError


def test_argument_errors_are_the_builtin_exceptions() -> None:
    """The other half of the rule (errors.py, docs/ARCHITECTURE.md): a bad argument to the engine
    is a plain ValueError, an absent or present key a KeyError, not a LeanclipError."""
    index = leanclip.Index(4)
    index.add(np.array([1]), np.ones((1, 4), np.float32))
    cases = [
        (ValueError, lambda: leanclip.Index(0)),
        (ValueError, lambda: index.search(np.full(4, np.nan, np.float32))),
        (KeyError, lambda: index.get(np.array([7]))),
        (KeyError, lambda: index.add(np.array([1]), np.ones((1, 4), np.float32))),
    ]
    for expected, call in cases:
        with pytest.raises(expected) as info:
            call()
        assert not isinstance(info.value, LeanclipError), info.value
