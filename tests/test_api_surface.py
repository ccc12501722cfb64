"""The public surface as the docs describe it: the error classes leanclip defines, found by
walking the package (not listed by hand), and the names docs/ARCHITECTURE.md promises."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

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


# --- docs/ARCHITECTURE.md's API blocks ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _api_blocks() -> list:
    """(module name, parsed block) for each ```python block of ARCHITECTURE.md, under the
    heading that names its module: ``## Title (`leanclip.module`...)``."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    blocks = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = section.splitlines()[0]
        named = re.search(r"`((?:leanclip|training)(?:\.\w+)*)`", heading)
        for code in re.findall(r"```python\n(.*?)```", section, flags=re.S):
            assert named, f"a Python block under '## {heading}' whose heading names no module"
            blocks.append((named.group(1), ast.parse(code, filename=f"ARCHITECTURE.md: {heading}")))
    return blocks


def _documented_params(fn: ast.FunctionDef) -> list:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg != "self"]


def _real_params(obj: Any) -> list:
    sig = inspect.signature(obj)
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind not in skip and p.name != "self"]


def _has_attribute(cls: type, name: str) -> bool:
    """A class attribute or property, or (Python classes) an attribute ``__init__`` sets."""
    if hasattr(cls, name):
        return True
    try:
        return f"self.{name}" in inspect.getsource(cls)
    except (OSError, TypeError):  # compiled class: only what hasattr sees
        return False


def test_architecture_api_blocks_name_what_exists() -> None:
    """Every class, function, method and attribute in ARCHITECTURE.md's API blocks exists, and
    every documented function lists the real parameters, in order."""
    blocks = _api_blocks()
    assert len(blocks) >= 6 and {m for m, _ in blocks} >= {"leanclip._engine", "leanclip.encoder"}
    problems = []
    for module_name, tree in blocks:
        module = importlib.import_module(module_name)
        for node in tree.body:
            where = f"{module_name}.{getattr(node, 'name', '')}"
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if not hasattr(module, node.target.id):
                    problems.append(f"{module_name}.{node.target.id} does not exist")
                continue
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                continue
            obj = getattr(module, node.name, None)
            if obj is None:
                problems.append(f"{where} does not exist")
                continue
            if isinstance(node, ast.FunctionDef):
                if _documented_params(node) != _real_params(obj):
                    problems.append(f"{where}{_documented_params(node)} is {_real_params(obj)}")
                continue
            for member in node.body:
                if isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    if not _has_attribute(obj, member.target.id):
                        problems.append(f"{where}.{member.target.id} does not exist")
                elif isinstance(member, ast.FunctionDef):
                    if member.name == "__init__":
                        real = _real_params(obj)
                    elif not hasattr(obj, member.name):
                        problems.append(f"{where}.{member.name} does not exist")
                        continue
                    elif member.name.startswith("__"):
                        continue  # slots (__len__, __contains__): their existence is the contract
                    else:
                        real = _real_params(getattr(obj, member.name))
                    if _documented_params(member) != real:
                        problems.append(f"{where}.{member.name}{_documented_params(member)} is {real}")
    assert not problems, "\n".join(problems)


def test_engine_names_are_reexported_from_leanclip() -> None:
    """The Engine heading promises ``leanclip.X is leanclip._engine.X`` for each of its names."""
    (engine,) = [tree for module, tree in _api_blocks() if module == "leanclip._engine"]
    names = [n.name for n in engine.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    assert "IVFIndex" in names and "mine_hard_negatives" in names
    for name in names:
        assert getattr(leanclip, name) is getattr(leanclip._engine, name), name


def test_every_bad_input_row_names_tests_that_exist() -> None:
    """docs/reliability.md's bad-input table: each row's last cell names test files (and tests in
    them, ``file.py::test_a, ::test_b``) that exist: pytest files under tests/, or the engine's
    Rust tests by their path (``rust/engine/tests/x.rs::name``)."""
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    table = text[text.index("### Bad inputs") :].split("\n\n", 3)[2]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # the header row
    assert len(rows) > 50, "the bad-input table was not found"
    missing = []
    for row in rows:
        cell = row.rstrip().rstrip("|").rsplit("|", 1)[1].strip()
        for group in cell.split(";"):
            m = re.match(r"\s*(test_\w+\.py|rust/[\w/]+\.rs)(.*)", group)
            if not m:
                missing.append(f"{group.strip()!r}: no test file named")
                continue
            path = ROOT / ("" if m.group(1).startswith("rust/") else "tests") / m.group(1)
            if not path.is_file():
                missing.append(f"{m.group(1)}: no such file")
                continue
            source = path.read_text(encoding="utf-8")
            define = "fn" if path.suffix == ".rs" else "def"
            for name in re.findall(r"::(\w+)", m.group(2)):
                if not re.search(rf"^\s*(async )?{define} {name}\(", source, flags=re.M):
                    missing.append(f"{m.group(1)}::{name}: no such test")
    assert not missing, "\n".join(missing)
