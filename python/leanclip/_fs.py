"""Filesystem helpers shared by every module that writes: one home for path types, atomic file
writes and staged directories.

* :func:`atomic_write` — write a file through a sibling temporary, fsync, rename over the target:
  readers see the old file or the new one, never a torn one.
* :func:`staged_dir` — build a directory (a bundle, a cache entry) in a sibling temporary folder
  and move it into place only when the build finished; an interrupted build leaves nothing under
  the final name, and a failed one leaves the old directory as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Tuple[int, str]]:
    """A temporary sibling of ``target`` (open descriptor, name) for the body to fill: renamed
    over ``target`` on a clean exit (then the folder is fsynced), removed on an exception."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        yield fd, tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, perms: int = 0o644) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit fsync it and rename it
    over ``path`` (then fsync the folder). On an exception the temporary is removed and ``path``
    is untouched. ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', not {mode!r}")
    encoding = "utf-8" if mode == "w" else None
    with _replacing(Path(path)) as (fd, tmp):
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, perms)  # mkstemp makes 0600; what we write is meant to be shared


def atomic_write_with(path: PathLike, writer: Callable[[str], None]) -> None:
    """Atomic write for libraries that insist on a file name (``torch.save``, ``np.save``):
    ``writer(tmp_name)`` writes the temporary, which is then renamed over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(target) as (fd, tmp):
        os.close(fd)
        writer(tmp)


@contextlib.contextmanager
def staged_dir(target: PathLike, *, check: Optional[Callable[[Path], object]] = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on a clean exit run ``check(folder)``
    (which raises to refuse), then swap the folder into place (the old ``target``, if any, is
    removed only after the new one is complete). On an exception nothing under ``target``
    changes and the temporary folder is removed."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".staging", dir=final.parent))
    stage = work / "new"
    stage.mkdir()
    try:
        yield stage
        if check is not None:
            check(stage)
        if final.exists():
            os.replace(final, work / "old")
        os.replace(stage, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
