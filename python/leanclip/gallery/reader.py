"""What every read of one gallery shares: its read-only connection, the committed generation's
index files (mapped once, cached per generation), and the model (loaded on first need).

Readers never lock: a writer commits a new generation while they read (see
:mod:`leanclip.gallery.sync`), so a snapshot whose files a checkpoint just removed is read
again, and a mapped file changed underneath a search drops the cache (:meth:`Reader.guard`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from leanclip._fs import PathLike
from leanclip.gallery import kinds
from leanclip.gallery import store as db
from leanclip.gallery.errors import GalleryError, ModelMismatchError, StaleSnapshot
from leanclip.gallery.model import EncoderLike
from leanclip.gallery.store import StoreLayout

__all__ = ["Reader"]


class Reader:
    """The read side of the gallery at ``layout``; ``model`` as for :class:`~leanclip.gallery.Gallery`.
    The connection and the caches are used under ``lock`` (a server searches from several
    threads)."""

    def __init__(
        self, layout: StoreLayout, model: Union[EncoderLike, PathLike, None], nprobe: Optional[int]
    ) -> None:
        self.layout = layout
        self.nprobe = nprobe  # IVF lists scanned per query; None: the index's own (set at indexing)
        self.lock = threading.RLock()
        self.cached: Optional[Tuple[int, Any]] = None  # (generation, Index) for queries
        self.cached_sim: Optional[Tuple[int, Any]] = None  # (generation, image-to-image Index)
        self.model_source = ""  # bundle path of the model, recorded so later runs reuse it
        self._conn: Optional[sqlite3.Connection] = None
        self._model_arg = model
        self._encoder: Optional[EncoderLike] = model if isinstance(model, EncoderLike) else None

    # -- the model -------------------------------------------------------------------------

    @property
    def encoder(self) -> EncoderLike:
        """The model given, else the one the gallery was indexed with, else the default one
        (``leanclip.registry``); loaded on first use."""
        if self._encoder is None:
            from leanclip import registry

            arg = self._model_arg
            if arg is None:
                recorded = self._recorded_model()
                if recorded and registry.is_bundle(recorded):
                    arg = recorded
            path = registry.resolve(arg)  # type: ignore[arg-type]
            self.model_source = str(path.absolute())
            self._encoder = registry.load_encoder(path)
        return self._encoder

    def _recorded_model(self) -> str:
        if not self.exists():
            return ""
        try:
            with self.lock:
                row = self.connection().execute("SELECT value FROM meta WHERE key='model_source'").fetchone()
        except (sqlite3.DatabaseError, GalleryError):
            return ""
        return row[0] if row else ""

    def checked_encoder(self, meta: Dict[str, str]) -> EncoderLike:
        """The model, which must be the one the gallery was indexed with (``meta``)."""
        enc = self.encoder
        mid = meta.get("model_id", "")
        if mid and mid != enc.model_id:
            root = self.layout.root
            raise ModelMismatchError(
                f"gallery {root} was indexed with model {mid}, not {enc.model_id}; "
                f"run `leanclip index {root}` with this model to re-encode"
            )
        return enc

    # -- the connection --------------------------------------------------------------------

    def exists(self) -> bool:
        return self.layout.db_path.is_file()

    def connection(self) -> sqlite3.Connection:
        """The read-only connection, opened (and its schema checked) on first use."""
        if self._conn is None:
            if not self.exists():
                raise GalleryError(
                    f"{self.layout.root} has no gallery yet (no {self.layout.db_path}); "
                    f"run `leanclip index {self.layout.root}`"
                )
            self._conn = db.open_reader(self.layout.db_path)
            db.check_schema(self._conn, self.layout.db_path)
        return self._conn

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self.forget()

    def key_of(self, image: PathLike) -> Optional[int]:
        """The key of ``image`` if it is an unchanged indexed file of this gallery."""
        try:
            real = Path(os.path.realpath(image))
            rel = real.relative_to(Path(os.path.realpath(self.layout.root)))
            st = os.stat(real)
        except (ValueError, OSError):
            return None
        with self.lock:
            row = db.ok_row(self.connection(), os.fsencode(rel.as_posix()))
        if row is not None and row.key is not None and row.same_file(st):
            return row.key
        return None

    # -- the committed generation ----------------------------------------------------------

    def snapshot(self) -> Tuple[int, Any, Dict[str, str]]:
        """The committed generation, its index (cached across calls) and the meta table."""
        from leanclip import Index, IndexFileError

        with self.lock:
            conn = self.connection()
            for _ in range(20):
                meta = db.read_meta(conn)
                gen = int(meta.get("generation", 0))
                if self.cached is not None and self.cached[0] == gen:
                    return gen, self.cached[1], meta
                if gen == 0 or not meta.get("dim"):
                    index = Index(max(1, int(meta.get("dim", 1) or 1)))
                else:
                    try:
                        index = kinds.load_index(
                            self.layout.index_path(gen), meta.get("index_kind", "exact"), mmap=True
                        )
                        kinds.set_search_nprobe(index, self.nprobe)
                    except FileNotFoundError:
                        # a writer committed a newer generation and removed this file: re-read
                        if conn.in_transaction:
                            raise StaleSnapshot() from None  # the caller restarts its transaction
                        time.sleep(0.05)
                        continue
                    except IndexFileError as exc:
                        raise self._damaged("index file is damaged", exc) from None
                self.cached = (gen, index)
                return gen, index, meta
        raise GalleryError(f"index file for generation {gen} keeps disappearing in {self.layout.store}")

    def similarity_index(self, gen: int, meta: Dict[str, str]) -> Optional[Any]:
        """The image-to-image index of generation ``gen`` (an exact Index, cached); None when
        the gallery has none (its model has no image-to-image vectors)."""
        from leanclip import Index, IndexFileError

        if gen == 0 or not int(meta.get("similarity_dim", 0) or 0):
            return None
        with self.lock:
            if self.cached_sim is not None and self.cached_sim[0] == gen:
                return self.cached_sim[1]
            path = self.layout.similar_path(gen)
            try:
                sim = Index.load(os.fspath(path), mmap=True)
            except FileNotFoundError:
                if self.layout.index_path(gen).exists():
                    # a checkpoint removes index-<G> before similar-<G>: this one is just missing
                    raise GalleryError(
                        f"the gallery's image-to-image index {path.name} is missing; "
                        f"run `leanclip index {self.layout.root}` to rebuild it"
                    ) from None
                # a writer committed a newer generation and removed the files: the caller's
                # snapshot is stale (it re-reads the generation)
                raise StaleSnapshot() from None
            except IndexFileError as exc:
                raise self._damaged("image-to-image index is damaged", exc) from None
            self.cached_sim = (gen, sim)
            return sim

    def snapshots(self, similar: bool = True) -> Tuple[Any, Optional[Any], Dict[str, str]]:
        """The joint index, the image-to-image index (None without one, or unless ``similar``)
        and the meta of one committed generation."""
        with self.lock:
            for _ in range(20):
                gen, index, meta = self.snapshot()
                if not similar:
                    return index, None, meta
                try:
                    return index, self.similarity_index(gen, meta), meta
                except StaleSnapshot:
                    if self.connection().in_transaction:
                        raise
                    time.sleep(0.05)  # a writer committed meanwhile: take the new generation
        raise GalleryError(f"the image-to-image index keeps disappearing in {self.layout.store}")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a read of a cached index: the engine raises IndexFileError when the mapped
        file changed underneath it (truncated, rewritten in place); the cache is dropped, so
        the next query maps the file afresh, and the error says what to do."""
        from leanclip import IndexFileError

        try:
            yield
        except IndexFileError as exc:
            self.forget()
            raise self._damaged("index file changed or is damaged", exc) from None

    def forget(self) -> None:
        """Drop the cached indexes (after an update, or a file changed underneath)."""
        with self.lock:
            self.cached = None
            self.cached_sim = None

    def _damaged(self, what: str, exc: BaseException) -> GalleryError:
        return GalleryError(
            f"the gallery's {what} ({exc}); run `leanclip index {self.layout.root}` to rebuild it"
        )
