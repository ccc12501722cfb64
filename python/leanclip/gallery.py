"""Gallery: a photo folder kept in step with a SQLite database and a saved leanclip Index.

Store layout (default ``ROOT/.leanclip/``)::

    gallery.db        SQLite (WAL): one row per file (path, size, mtime, sha256, key, status,
                      reason) and a ``meta`` table (schema version, model id, dim, generation)
    index-<G>.lci     the Index holding exactly the keys of the rows with status 'ok' at
                      generation G
    similar-<G>.lci   only for a model with image-to-image vectors (``Encoder.has_similarity``):
                      those vectors, same keys as index-<G>.lci, saved before the same commit;
                      queries made only of images search it (``leanclip.encoder.query_space``)
    lock              held (flock) by the one process running ``update()``

Commit protocol (crash consistency). The database's ``generation`` names the one index file
that matches its rows. A checkpoint saves the in-memory index as a *new* file
``index-<G+1>.lci`` (atomically), then commits the rows together with ``generation = G+1`` in
one SQLite transaction, and only then deletes ``index-<G>.lci``. A kill before the commit leaves
the old rows and the old index (both still on disk) in force; a kill after it leaves the new
pair. Stray index files are removed by the next ``update()``. Keys are never reused, so a reader
holding an older index never maps a key to the wrong file.

Query syntax (``Gallery.search``): unsigned words form one phrase; ``+term`` adds and ``-term``
subtracts a term; quotes group words; ``img:PATH`` makes a term an image::

    beach at night +sunset -people +img:photos/dog.jpg -"city lights"
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import shlex
import sqlite3
import stat
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)

import numpy as np

SCHEMA_VERSION = 1
STORE_DIRNAME = ".leanclip"
DB_NAME = "gallery.db"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
# Refuse to decode images that declare more pixels than this (decompression bombs).
DEFAULT_MAX_PIXELS = 64_000_000

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stage is "scan", "hash" or "encode"."""



class _TwinIndex:
    """The joint Index and its image-to-image twin (same keys), mutated together by update().

    Vectors go in and come out as ``[joint | similarity]`` rows, so the update code that moves
    vectors around (new files, duplicates, removals) keeps both in step without knowing."""

    def __init__(self, joint: Any, sim: Any) -> None:
        self.joint, self.sim = joint, sim

    @property
    def dim(self) -> int:
        return int(self.joint.dim)

    @property
    def dtype(self) -> str:
        return str(self.joint.dtype)

    def __contains__(self, key: Any) -> bool:
        return key in self.joint

    def __len__(self) -> int:
        return len(self.joint)

    def keys(self) -> Any:
        return self.joint.keys()

    def remove(self, keys: Any) -> None:
        self.joint.remove(keys)
        self.sim.remove(keys)

    def add(self, keys: Any, vecs: np.ndarray) -> None:
        self.joint.add(keys, np.ascontiguousarray(vecs[:, : self.dim]))
        self.sim.add(keys, np.ascontiguousarray(vecs[:, self.dim :]))

    def get(self, keys: Any) -> np.ndarray:
        return np.concatenate([np.asarray(self.joint.get(keys)), np.asarray(self.sim.get(keys))], axis=1)


class GalleryError(Exception):
    """A gallery cannot be opened, updated or queried; the message says why."""


class GalleryBusyError(GalleryError):
    """Another process is updating this gallery."""


class ModelMismatchError(GalleryError):
    """The gallery was indexed with another model than the one asked for."""


class ImageError(GalleryError):
    """One image cannot be read or decoded; the message names the file and the reason."""


class _StaleSnapshot(Exception):
    """A read transaction's generation was superseded and its index file removed."""


@runtime_checkable
class EncoderLike(Protocol):
    """What the gallery needs of a model (``leanclip.Encoder`` has it)."""

    dim: int
    model_id: str

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, images: Sequence[Any]) -> np.ndarray: ...


@dataclass
class Hit:
    """One search result."""

    path: Path  # absolute path of the file
    name: str  # path relative to the gallery root, printable
    score: float
    key: int

    def to_dict(self) -> Dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "score": round(self.score, 6), "key": self.key}


@dataclass
class UpdateSummary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    renamed: int = 0
    copied: int = 0  # new files whose content was already indexed: vector reused, not encoded
    unchanged: int = 0
    failed: int = 0  # files that failed in this run
    encoded: int = 0
    total_ok: int = 0
    seconds: float = 0.0
    model_id: str = ""
    recovered: str = ""  # what was repaired at the start, if anything
    failures: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["failures"] = [{"name": n, "reason": r} for n, r in self.failures]
        return out


# ----------------------------------------------------------------------------- query syntax


@dataclass(frozen=True)
class Term:
    sign: int  # +1 or -1
    kind: str  # "text" or "image"
    value: str


def parse_query(query: str) -> List[Term]:
    """Parse the query syntax described in the module docstring into terms."""
    if len(query) > 4096:
        raise GalleryError("query is longer than 4096 characters")
    try:
        tokens = shlex.split(query, posix=True)
    except ValueError as exc:
        raise GalleryError(f"cannot parse query {query!r}: {exc}") from None
    phrase: List[str] = []
    terms: List[Term] = []
    for tok in tokens:
        sign = 0
        if tok[:1] in "+-" and len(tok) > 1:
            sign, tok = (1 if tok[0] == "+" else -1), tok[1:]
        kind = "text"
        if tok.startswith("img:"):
            kind, tok = "image", tok[4:]
            if not tok:
                raise GalleryError("'img:' must be followed by an image path")
        if sign == 0 and kind == "text":
            phrase.append(tok)
        else:
            terms.append(Term(sign or 1, kind, tok))
    if phrase:
        terms.insert(0, Term(1, "text", " ".join(phrase)))
    if not any(t.sign > 0 for t in terms):
        raise GalleryError(f"query {query!r} has no positive term")
    return terms


# ----------------------------------------------------------------------------- images


def open_image(path: PathLike, *, size: int = 224, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """Decode an image to RGB with bounded memory; raise ImageError naming the problem.

    JPEGs are decoded at reduced scale (``draft``) and large images shrunk by an integer factor
    so that the short side is 2-4x the model's input size: the encoder does the exact resize.
    """
    from PIL import Image, ImageOps

    name = os.fsdecode(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: not a regular file")
    if st.st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            try:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"{name}: declares {w}x{h} pixels, more than the limit of {max_pixels:,} "
                        "(possible decompression bomb); not decoded"
                    )
                if im.format == "JPEG":
                    im.draft("RGB", (size, size))
                im.load()
                out: Image.Image = ImageOps.exif_transpose(im)
                if out.mode != "RGB":
                    out = out.convert("RGB")
                short = min(out.size)
                if short > 2 * size:
                    out = out.reduce(short // (2 * size))
                return out
            except BaseException:
                im.close()
                raise
    except ImageError:
        raise
    except PermissionError as exc:
        raise ImageError(f"{name}: permission denied ({exc.strerror})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (corrupt or wrong extension)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: too many pixels, possible decompression bomb ({exc})") from None
    except MemoryError:
        raise ImageError(f"{name}: out of memory while decoding") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg:
            msg = f"truncated image data ({msg})"
        raise ImageError(f"{name}: cannot decode: {msg}") from None


def _sha256(path: PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _display(rel: bytes) -> str:
    """A printable form of a stored relative path (non-UTF-8 bytes shown as U+FFFD)."""
    return rel.decode("utf-8", "replace")


# ----------------------------------------------------------------------------- gallery

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,          -- relative to root, os.fsencode'd, '/' separated
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    key INTEGER UNIQUE,             -- vector key in the index, NULL unless status = 'ok'
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'pending')),
    reason TEXT
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
"""


@dataclass
class _Found:
    rel: bytes
    abspath: str
    size: int
    mtime_ns: int


class Gallery:
    """A photo folder indexed for search. See the module docstring for the store and protocol.

    ``model`` is an encoder object (anything with ``dim``, ``model_id``, ``encode_text``,
    ``encode_images``), a bundle directory, or None for the default model of
    ``leanclip.models``. It is loaded only when first needed.
    """

    def __init__(
        self,
        root: PathLike,
        store: Optional[PathLike] = None,
        model: Union[EncoderLike, PathLike, None] = None,
        *,
        batch_size: int = 32,
        checkpoint_every: int = 512,
        checkpoint_seconds: float = 30.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        dtype: Optional[str] = None,
        checkpoint_overhead: float = 0.1,
    ) -> None:
        if dtype not in (None, "f32", "f16", "i8"):
            raise GalleryError(f"dtype must be 'f32', 'f16' or 'i8', got {dtype!r}")
        self.dtype = dtype  # vector storage precision; None keeps the store's (new stores: f32)
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise GalleryError(f"gallery folder {self.root} does not exist or is not a directory")
        self.store = Path(store).expanduser().absolute() if store else self.root / STORE_DIRNAME
        self.db_path = self.store / DB_NAME
        self.batch_size = max(1, int(batch_size))
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.checkpoint_seconds = float(checkpoint_seconds)
        # a checkpoint rewrites the whole index file: they are spaced so that saving takes at
        # most this fraction of the run (1.0: no spacing beyond checkpoint_every / _seconds)
        self.checkpoint_overhead = min(1.0, max(1e-3, float(checkpoint_overhead)))
        self.max_pixels = int(max_pixels)
        self._model_arg = model
        self._encoder: Optional[EncoderLike] = model if isinstance(model, EncoderLike) else None
        self._lock = threading.RLock()
        self._conn: Optional[sqlite3.Connection] = None
        self._cached: Optional[Tuple[int, Any]] = None  # (generation, Index) for queries
        self._cached_sim: Optional[Tuple[int, Any]] = None  # (generation, similarity Index)
        self._model_source = ""  # bundle path of the model, recorded so later runs reuse it

    # -- resources -------------------------------------------------------------------------

    @property
    def encoder(self) -> EncoderLike:
        if self._encoder is None:
            from leanclip import models

            arg = self._model_arg
            if arg is None:
                # by default a gallery keeps the model it was indexed with
                recorded = self._recorded_model()
                if recorded and models.is_bundle(recorded):
                    arg = recorded
            path = models.resolve(arg)  # type: ignore[arg-type]
            self._model_source = str(path.absolute())
            self._encoder = models.load_encoder(path)
        return self._encoder

    def _recorded_model(self) -> str:
        if not self.exists():
            return ""
        try:
            with self._lock:
                row = self._reader().execute("SELECT value FROM meta WHERE key='model_source'").fetchone()
        except (sqlite3.DatabaseError, GalleryError):
            return ""
        return row[0] if row else ""

    def exists(self) -> bool:
        return self.db_path.is_file()

    def _open_db(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                os.fspath(self.db_path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"gallery database {self.db_path} cannot be opened: {exc}") from None
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.exists():
                raise GalleryError(
                    f"{self.root} has no gallery yet (no {self.db_path}); run `leanclip index {self.root}`"
                )
            self._conn = self._open_db()
            self._check_schema(self._conn)
        return self._conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{self.db_path} is not a leanclip gallery database ({exc})") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            found = row[0] if row else "none"
            raise GalleryError(
                f"{self.db_path} has schema version {found}; this leanclip reads version {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._cached = None
            self._cached_sim = None

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, conn: sqlite3.Connection) -> Dict[str, str]:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def _index_path(self, generation: int) -> Path:
        return self.store / f"index-{generation}.lci"

    def _similar_path(self, generation: int) -> Path:
        return self.store / f"similar-{generation}.lci"

    def _similarity_snapshot(self, gen: int, meta: Dict[str, str]) -> Optional[Any]:
        """The image-to-image index of generation ``gen``; None when the gallery has none."""
        from leanclip import Index, IndexFileError

        if gen == 0 or not int(meta.get("similarity_dim", 0) or 0):
            return None
        with self._lock:
            if self._cached_sim is not None and self._cached_sim[0] == gen:
                return self._cached_sim[1]
            try:
                sim = Index.load(os.fspath(self._similar_path(gen)), mmap=True)
            except FileNotFoundError:
                return None  # superseded meanwhile: the joint space still answers
            except IndexFileError as exc:
                raise GalleryError(
                    f"the gallery's image-to-image index is damaged ({exc}); run `leanclip index {self.root}`"
                ) from None
            self._cached_sim = (gen, sim)
            return sim

    # -- reading ---------------------------------------------------------------------------

    def info(self) -> Dict[str, Any]:
        """Counts and identity of the gallery (model id, generation, store)."""
        with self._lock:
            conn = self._reader()
            meta = self._meta(conn)
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        return {
            "root": str(self.root),
            "store": str(self.store),
            "model_id": meta.get("model_id", ""),
            "dim": int(meta.get("dim", 0)),
            "generation": int(meta.get("generation", 0)),
            "ok": counts.get("ok", 0),
            "failed": counts.get("failed", 0),
            "pending": counts.get("pending", 0),
        }

    def failures(self) -> List[Tuple[str, str]]:
        """(name, reason) of every file recorded as failed."""
        with self._lock:
            rows = self._reader().execute(
                "SELECT path, reason FROM files WHERE status='failed' ORDER BY path"
            ).fetchall()
        return [(_display(bytes(p)), r or "") for p, r in rows]

    def files(self) -> List[Tuple[str, str, Optional[int]]]:
        """(name, status, key) of every row, in path order."""
        with self._lock:
            rows = self._reader().execute("SELECT path, status, key FROM files ORDER BY path").fetchall()
        return [(_display(bytes(p)), s, k) for p, s, k in rows]

    def _snapshot(self) -> Tuple[int, Any, Dict[str, str]]:
        """The committed generation, its index (cached across calls) and the meta table."""
        from leanclip import Index, IndexFileError

        with self._lock:
            conn = self._reader()
            for _ in range(20):
                meta = self._meta(conn)
                gen = int(meta.get("generation", 0))
                if self._cached is not None and self._cached[0] == gen:
                    return gen, self._cached[1], meta
                if gen == 0 or not meta.get("dim"):
                    index = Index(max(1, int(meta.get("dim", 1) or 1)))
                else:
                    try:
                        index = Index.load(os.fspath(self._index_path(gen)), mmap=True)
                    except FileNotFoundError:
                        # a writer committed a newer generation and removed this file: re-read
                        if conn.in_transaction:
                            raise _StaleSnapshot() from None  # the caller restarts its transaction
                        time.sleep(0.05)
                        continue
                    except IndexFileError as exc:
                        raise GalleryError(
                            f"the gallery's index file is damaged ({exc}); run `leanclip index {self.root}` "
                            "to rebuild it"
                        ) from None
                self._cached = (gen, index)
                return gen, index, meta
        raise GalleryError(f"index file for generation {gen} keeps disappearing in {self.store}")

    def _rows_for_keys(self, keys: Sequence[int]) -> Dict[int, bytes]:
        out: Dict[int, bytes] = {}
        conn = self._reader()
        keys = [int(k) for k in keys]
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, path FROM files WHERE status='ok' AND key IN ({','.join('?' * len(chunk))})"
            for k, p in conn.execute(q, chunk):
                out[int(k)] = bytes(p)
        return out

    def _key_of(self, image: PathLike) -> Optional[int]:
        """The key of ``image`` if it is an unchanged indexed file of this gallery."""
        try:
            real = Path(os.path.realpath(image))
            rel = real.relative_to(Path(os.path.realpath(self.root)))
            st = os.stat(real)
        except (ValueError, OSError):
            return None
        rel_bytes = os.fsencode(rel.as_posix())
        row = self._reader().execute(
            "SELECT key, size, mtime_ns FROM files WHERE path=? AND status='ok'", (rel_bytes,)
        ).fetchone()
        if row and row[1] == st.st_size and row[2] == st.st_mtime_ns:
            return int(row[0])
        return None

    def _check_model(self, meta: Dict[str, str]) -> EncoderLike:
        enc = self.encoder
        mid = meta.get("model_id", "")
        if mid and mid != enc.model_id:
            raise ModelMismatchError(
                f"gallery {self.root} was indexed with model {mid}, not {enc.model_id}; "
                f"run `leanclip index {self.root}` with this model to re-encode"
            )
        return enc

    def query_vector(self, query: Union[str, Sequence[Term]]) -> Tuple[np.ndarray, List[int]]:
        """The unit query vector of a query string or terms, and gallery keys of its image terms.

        A query made only of images gets an image-to-image vector when the gallery has them
        (its length is then the model's ``similarity_dim``; ``search`` routes it there)."""
        vec, own, _ = self._query_vectors([query])[0]
        return vec, own

    def _query_vectors(self, queries: Sequence[Union[str, Sequence[Term]]]) -> List[Tuple[np.ndarray, List[int], str]]:
        """(vector, own keys, space) of several queries; their text terms go through one encoder
        call. ``space`` is "similarity" for image-only queries of a gallery with image-to-image
        vectors (``leanclip.encoder.query_space``), else "joint"."""
        from leanclip.encoder import query_space

        parsed = [parse_query(q) if isinstance(q, str) else list(q) for q in queries]
        gen, index, meta = self._snapshot()
        sim_index = self._similarity_snapshot(gen, meta)
        dim = int(meta.get("dim", 0))
        texts = sorted({t.value for terms in parsed for t in terms if t.kind == "text"})
        text_vecs: Dict[str, np.ndarray] = {}
        if texts:
            enc = self._check_model(meta)
            for text, tv in zip(texts, np.asarray(enc.encode_text(texts), dtype=np.float32)):
                text_vecs[text] = tv
        out = []
        for terms in parsed:
            space = query_space([t.kind for t in terms], sim_index is not None)
            store = sim_index if space == "similarity" else index
            want_dim = int(sim_index.dim) if space == "similarity" else dim
            vecs: List[np.ndarray] = []
            own_keys: List[int] = []
            for t in terms:
                if t.kind == "text":
                    v = text_vecs[t.value]
                else:
                    key = self._key_of(t.value)
                    if key is not None and key in store:
                        v = np.asarray(store.get([key]), dtype=np.float32)[0]
                        if t.sign > 0:
                            own_keys.append(key)
                    else:
                        enc = self._check_model(meta)
                        size = _model_image_size(enc)
                        im = open_image(t.value, size=size, max_pixels=self.max_pixels)
                        if space == "similarity":
                            v = np.asarray(enc.encode_images([im], kind="similarity"), dtype=np.float32)[0]  # type: ignore[call-arg]
                        else:
                            v = np.asarray(enc.encode_images([im]), dtype=np.float32)[0]
                if want_dim and v.shape[0] != want_dim:
                    raise ModelMismatchError(f"query vector has dim {v.shape[0]}, gallery has {want_dim}")
                n = float(np.linalg.norm(v))
                vecs.append(t.sign * (v / n if n > 0 else v))
            q = np.sum(vecs, axis=0).astype(np.float32)
            n = float(np.linalg.norm(q))
            if not np.isfinite(n) or n == 0.0:
                raise GalleryError("the query's terms cancel out (positive and negative terms are the same)")
            out.append((q / n, own_keys, space))
        return out

    def search(
        self,
        query: Union[str, Sequence[Term], np.ndarray],
        k: int = 10,
        *,
        min_score: Optional[float] = None,
        paths: Optional[Sequence[str]] = None,
        exclude_self: bool = True,
    ) -> List[Hit]:
        """Top-``k`` files for a query string (see module docstring), terms, or a vector.

        ``paths``: glob patterns on the file name relative to the root (``*`` matches across
        folders); a file must match one. ``min_score``: drop hits scoring below it.
        Image terms that are files of this gallery are excluded from their own results.
        """
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        if isinstance(query, np.ndarray):
            qv = np.asarray(query, dtype=np.float32)
            own: List[int] = []
            gen, index, meta = self._snapshot()
            sim_index = self._similarity_snapshot(gen, meta)
            # a vector of the image-to-image width (and not the joint one) searches that index
            space = ("similarity" if sim_index is not None and qv.shape[-1] == sim_index.dim != index.dim
                     else "joint")
        else:
            qv, own, space = self._query_vectors([query])[0]
        return self._search_vectors(qv[None, :], [own if exclude_self else []], k, min_score, paths, space)[0]

    def search_batch(
        self,
        queries: Sequence[Union[str, Sequence[Term]]],
        k: int = 10,
        *,
        min_score: Optional[float] = None,
        paths: Optional[Sequence[str]] = None,
    ) -> List[List[Hit]]:
        """``search`` for many queries at once: one encoder call and one index search for all
        (several times the throughput of single queries; the server batches concurrent requests)."""
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        vecs = self._query_vectors(queries)
        out: List[List[Hit]] = [[] for _ in vecs]
        for space in ("joint", "similarity"):
            idx = [i for i, v in enumerate(vecs) if v[2] == space]
            if idx:
                hits = self._search_vectors(np.stack([vecs[i][0] for i in idx]), [vecs[i][1] for i in idx],
                                            k, min_score, paths, space)
                for i, h in zip(idx, hits):
                    out[i] = h
        return out

    def _search_vectors(self, qv: np.ndarray, excludes: List[List[int]], k: int, min_score: Optional[float],
                        paths: Optional[Sequence[str]], space: str = "joint") -> List[List[Hit]]:
        gen, index, meta = self._snapshot()
        if space == "similarity":
            sim_index = self._similarity_snapshot(gen, meta)
            if sim_index is None:
                raise GalleryError("the gallery's image-to-image index changed during the query; retry it")
            index = sim_index
        total = len(index)
        if total == 0:
            return [[] for _ in excludes]
        results: List[Optional[List[Hit]]] = [None] * len(excludes)
        todo = list(range(len(excludes)))
        want = k + max(len(e) for e in excludes)
        while todo:
            kk = min(total, want)
            keys, scores = index.search(qv[todo], kk)
            keys, scores = np.asarray(keys), np.asarray(scores)
            with self._lock:
                rows = self._rows_for_keys(np.unique(keys).tolist())
            unfinished = []
            for row_i, qi in enumerate(todo):
                hits: List[Hit] = []
                below = False
                skip = set(excludes[qi])
                for key, score in zip(keys[row_i].tolist(), scores[row_i].tolist()):
                    if min_score is not None and score < min_score:
                        below = True
                        break
                    rel = rows.get(int(key))
                    if rel is None or key in skip:  # removed since this snapshot, or the query image
                        continue
                    name = _display(rel)
                    if paths and not any(fnmatch.fnmatchcase(name, p) for p in paths):
                        continue
                    hits.append(Hit(self.root / os.fsdecode(rel), name, float(score), int(key)))
                    if len(hits) == k:
                        break
                if len(hits) == k or below or kk >= total:
                    results[qi] = hits
                else:  # filters left too few: look deeper
                    unfinished.append(qi)
            todo = unfinished
            want = kk * 4
        return [r if r is not None else [] for r in results]

    def similar(self, image: PathLike, k: int = 10, **kw: Any) -> List[Hit]:
        """Files most like ``image`` (a path; reuses its stored vector if it is in the gallery).

        Searches the image-to-image vectors when the gallery has them (a model with
        ``has_similarity``), else the joint ones; scores are cosines of that space."""
        return self.search([Term(1, "image", os.fspath(image))], k, **kw)

    def check(self) -> Tuple[List[int], List[int]]:
        """Consistency check: (keys of ok rows missing from the index, index keys without a row)."""
        with self._lock:
            conn = self._reader()
            for _ in range(50):
                conn.execute("BEGIN")  # one read snapshot for the generation and the rows
                try:
                    self._cached = None
                    self._cached_sim = None
                    _, index, _ = self._snapshot()
                    rows = {int(k) for (k,) in conn.execute("SELECT key FROM files WHERE status='ok'")}
                    break
                except _StaleSnapshot:
                    continue
                finally:
                    conn.execute("COMMIT")
            else:
                raise GalleryError(f"the gallery in {self.store} changes too fast to check")
        keys = {int(k) for k in np.asarray(index.keys()).tolist()}
        return sorted(rows - keys), sorted(keys - rows)

    # -- writing ---------------------------------------------------------------------------

    def _acquire_writer(self) -> int:
        self.store.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.store / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GalleryBusyError(f"another process is updating the gallery in {self.store}") from None
        return fd

    def _scan(self, progress: Optional[Progress]) -> Tuple[List[_Found], List[Tuple[bytes, str]]]:
        """Regular image files under root (symlinks are not followed), and entries that look
        like images but cannot be one (directories, devices) with the reason."""
        found: List[_Found] = []
        bad: List[Tuple[bytes, str]] = []
        root = os.fspath(self.root)
        store = os.path.realpath(self.store)

        def onerror(exc: OSError) -> None:
            # unreadable folder: its files stay as they were recorded; nothing is deleted
            unreadable.append(exc.filename)

        unreadable: List[str] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
            keep = []
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if d.startswith(".") or os.path.islink(full) or os.path.realpath(full) == store:
                    continue  # hidden folders, the store, and symlinked folders are skipped
                if os.path.splitext(d)[1].lower() in IMAGE_EXTENSIONS:
                    rel = os.fsencode(os.path.relpath(full, root).replace(os.sep, "/"))
                    bad.append((rel, "is a directory, not an image file"))
                keep.append(d)
            dirnames[:] = sorted(keep)
            for f in sorted(filenames):
                if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                full = os.path.join(dirpath, f)
                rel = os.fsencode(os.path.relpath(full, root).replace(os.sep, "/"))
                try:
                    st = os.lstat(full)
                except OSError as exc:
                    bad.append((rel, f"cannot stat: {exc.strerror}"))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    continue  # symlinks are never followed (loops, files outside the root)
                if not stat.S_ISREG(st.st_mode):
                    bad.append((rel, "not a regular file"))
                    continue
                found.append(_Found(rel, full, st.st_size, st.st_mtime_ns))
            if progress:
                progress("scan", len(found), 0)
        self._unreadable_dirs = unreadable
        return found, bad

    def update(self, progress: Optional[Progress] = None) -> UpdateSummary:
        """Bring the store in step with the folder; see the module docstring. Returns counts."""
        from leanclip import Index, IndexFileError

        t0 = time.perf_counter()
        enc = self.encoder
        summary = UpdateSummary(model_id=enc.model_id)
        lock_fd = self._acquire_writer()
        conn: Optional[sqlite3.Connection] = None
        state: Dict[str, Any] = {}
        try:
            conn = self._open_db()
            conn.execute("BEGIN IMMEDIATE")
            # A database without any table is ours, killed before its schema was committed
            # (connect() creates the file first): start it afresh rather than refuse it.
            fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            if fresh:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), ("generation", "0"), ("next_key", "1"),
                     ("model_id", ""), ("dim", "0")],
                )
            self._check_schema(conn)
            meta = self._meta(conn)
            gen = int(meta["generation"])
            next_key = int(meta["next_key"])
            index: Any = None
            reset_reason = ""
            state_dirty_dtype = False
            if meta.get("model_id") and meta["model_id"] != enc.model_id:
                reset_reason = f"model changed from {meta['model_id']} to {enc.model_id}: re-encoding all files"
            elif gen > 0:
                try:
                    index = Index.load(os.fspath(self._index_path(gen)))
                    if index.dim != enc.dim:
                        reset_reason = f"index dim {index.dim} != model dim {enc.dim}: re-encoding"
                        index = None
                except (FileNotFoundError, IndexFileError, OSError, ValueError) as exc:
                    reset_reason = f"index file for generation {gen} unusable ({exc}); re-encoding"
            want_dtype = self.dtype or meta.get("dtype") or "f32"
            if index is None:
                index = Index(enc.dim, dtype=want_dtype)  # type: ignore[arg-type]
            elif index.dtype != want_dtype:
                # another storage precision: convert the stored vectors, no re-encoding
                keys = np.asarray(index.keys(), dtype=np.uint64)
                converted = Index(enc.dim, dtype=want_dtype)  # type: ignore[arg-type]
                for i in range(0, len(keys), 65536):
                    converted.add(keys[i : i + 65536], index.get(keys[i : i + 65536]))
                index = converted
                state_dirty_dtype = True
            sim_dim = int(getattr(enc, "similarity_dim", 0) or 0) if getattr(enc, "has_similarity", False) else 0
            if sim_dim:
                sim: Any = None
                if not reset_reason and len(index) and meta.get("similarity_dim") == str(sim_dim):
                    try:
                        sim = Index.load(os.fspath(self._similar_path(gen)))
                    except (FileNotFoundError, IndexFileError, OSError, ValueError):
                        sim = None
                    if sim is not None and (sim.dim != sim_dim or len(sim) != len(index)):
                        sim = None
                if sim is None and len(index) and not reset_reason:
                    reset_reason = "no usable image-to-image index for this model: re-encoding"
                    index = Index(enc.dim, dtype=want_dtype)  # type: ignore[arg-type]
                if sim is None:
                    sim = Index(sim_dim, dtype=want_dtype)  # type: ignore[arg-type]
                elif sim.dtype != want_dtype:
                    keys = np.asarray(sim.keys(), dtype=np.uint64)
                    converted = Index(sim_dim, dtype=want_dtype)  # type: ignore[arg-type]
                    for i in range(0, len(keys), 65536):
                        converted.add(keys[i : i + 65536], sim.get(keys[i : i + 65536]))
                    sim = converted
                index = _TwinIndex(index, sim)
            if meta.get("similarity_dim", "0") != str(sim_dim):
                state_dirty_dtype = True  # the new generation records it
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('similarity_dim', ?)", (str(sim_dim),))
            if reset_reason:
                conn.execute("UPDATE files SET status='pending', key=NULL WHERE status='ok'")
                summary.recovered = reset_reason
            conn.execute("UPDATE meta SET value=? WHERE key='model_id'", (enc.model_id,))
            conn.execute("UPDATE meta SET value=? WHERE key='dim'", (str(enc.dim),))
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('dtype', ?)", (want_dtype,))
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('model_source', ?)",
                (getattr(self, "_model_source", ""),),
            )
            self._remove_stray_files(keep=gen)
            state.update(conn=conn, index=index, gen=gen, next_key=next_key,
                         dirty=bool(reset_reason or fresh or state_dirty_dtype))
            self._run_update(state, summary, progress)
            self._checkpoint(state)
            conn.execute("COMMIT")
        except BaseException:
            if conn is not None and conn.in_transaction:
                if state.get("clean") and isinstance(sys.exc_info()[1], KeyboardInterrupt):
                    # interrupted between batches: keep the finished work, then stop
                    try:
                        self._checkpoint(state)
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                else:
                    conn.execute("ROLLBACK")
            raise
        finally:
            if conn is not None:
                conn.close()
            os.close(lock_fd)
        with self._lock:
            self._cached = None
            self._cached_sim = None
        summary.total_ok = self.info()["ok"]
        summary.seconds = time.perf_counter() - t0
        return summary

    def _remove_stray_files(self, keep: int) -> None:
        keep_names = {self._index_path(keep).name, self._similar_path(keep).name}
        for entry in os.scandir(self.store):
            n = entry.name
            if n.startswith(("index-", ".index-", "similar-", ".similar-", ".tmp")) and n not in keep_names:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass

    def _checkpoint(self, state: Dict[str, Any]) -> None:
        """Save the index as a new generation, commit the rows with it, drop the old file.
        Leaves a new write transaction open."""
        conn: sqlite3.Connection = state["conn"]
        if not state["dirty"]:
            return
        old, new = state["gen"], state["gen"] + 1
        t0 = time.monotonic()
        if isinstance(state["index"], _TwinIndex):
            state["index"].sim.save(os.fspath(self._similar_path(new)))
            state["index"].joint.save(os.fspath(self._index_path(new)))
        else:
            state["index"].save(os.fspath(self._index_path(new)))
        state["last_save_s"] = time.monotonic() - t0
        conn.execute("UPDATE meta SET value=? WHERE key='generation'", (str(new),))
        conn.execute("UPDATE meta SET value=? WHERE key='next_key'", (str(state["next_key"]),))
        conn.execute("COMMIT")
        state["gen"], state["dirty"] = new, False
        state["last_checkpoint"] = time.monotonic()
        state["since_checkpoint"] = 0
        for path in (self._index_path(old), self._similar_path(old)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        conn.execute("BEGIN IMMEDIATE")

    def _new_keys(self, state: Dict[str, Any], n: int) -> List[int]:
        start = state["next_key"]
        state["next_key"] = start + n
        return list(range(start, start + n))

    def _run_update(self, state: Dict[str, Any], summary: UpdateSummary, progress: Optional[Progress]) -> None:
        conn: sqlite3.Connection = state["conn"]
        index = state["index"]
        state["last_checkpoint"] = time.monotonic()
        state["since_checkpoint"] = 0

        found, bad = self._scan(progress)
        rows: Dict[bytes, Tuple[int, int, Optional[str], Optional[int], str]] = {
            bytes(p): (s, m, h, k, st)
            for p, s, m, h, k, st in conn.execute("SELECT path, size, mtime_ns, sha256, key, status FROM files")
        }
        seen = {f.rel for f in found}
        bad_names = {rel for rel, _ in bad}

        # entries that look like images but are not files: record as failed
        for rel, reason in bad:
            old = rows.get(rel)
            if old and old[4] == "failed":
                summary.unchanged += 1
                continue
            if old and old[3] is not None:
                index.remove([old[3]])
            conn.execute(
                "INSERT OR REPLACE INTO files (path, size, mtime_ns, sha256, key, status, reason) "
                "VALUES (?, 0, 0, NULL, NULL, 'failed', ?)",
                (rel, reason),
            )
            summary.failed += 1
            summary.failures.append((_display(rel), reason))
            state["dirty"] = True

        # classify
        to_hash: List[_Found] = []
        for f in found:
            old = rows.get(f.rel)
            if old and old[0] == f.size and old[1] == f.mtime_ns and old[4] != "pending":
                summary.unchanged += 1
            else:
                to_hash.append(f)
        under_unreadable = tuple(
            os.fsencode(os.path.relpath(d, self.root).replace(os.sep, "/")) + b"/"
            for d in getattr(self, "_unreadable_dirs", [])
        )
        missing = {
            rel: r for rel, r in rows.items()
            if rel not in seen and rel not in bad_names and not rel.startswith(under_unreadable or (b"\0",))
        }
        # content of vanished ok rows, for rename detection
        vanished_by_hash: Dict[str, List[bytes]] = {}
        for rel, r in missing.items():
            if r[4] == "ok" and r[2]:
                vanished_by_hash.setdefault(r[2], []).append(rel)

        to_encode: List[Tuple[_Found, str]] = []
        for i, f in enumerate(to_hash):
            if progress:
                progress("hash", i, len(to_hash))
            try:
                digest = _sha256(f.abspath)
            except OSError as exc:
                reason = f"cannot read: {exc.strerror or exc}"
                self._record_failure(state, summary, rows, f, None, reason)
                continue
            old = rows.get(f.rel)
            if old is not None:
                if old[2] == digest and old[4] == "ok":
                    # same content, new mtime (touched / copied back): nothing to encode
                    conn.execute("UPDATE files SET size=?, mtime_ns=? WHERE path=?", (f.size, f.mtime_ns, f.rel))
                    summary.unchanged += 1
                    state["dirty"] = True
                else:
                    to_encode.append((f, digest))
                continue
            moved_from = vanished_by_hash.get(digest)
            if moved_from:
                src = moved_from.pop()
                del missing[src]
                conn.execute(
                    "UPDATE files SET path=?, size=?, mtime_ns=? WHERE path=?", (f.rel, f.size, f.mtime_ns, src)
                )
                summary.renamed += 1
                state["dirty"] = True
                continue
            to_encode.append((f, digest))
        if progress and to_hash:
            progress("hash", len(to_hash), len(to_hash))

        # deleted files leave the index
        if missing:
            gone = [r[3] for r in missing.values() if r[3] is not None]
            if gone:
                index.remove(np.asarray(gone, dtype=np.uint64))
            conn.executemany("DELETE FROM files WHERE path=?", [(rel,) for rel in missing])
            summary.removed += len(missing)
            state["dirty"] = True

        # duplicates of already indexed content: reuse the stored vector
        remaining: List[Tuple[_Found, str]] = []
        for f, digest in to_encode:
            dup = conn.execute(
                "SELECT key FROM files WHERE sha256=? AND status='ok' AND path<>? LIMIT 1", (digest, f.rel)
            ).fetchone()
            if dup is not None and int(dup[0]) in index:
                vec = index.get([int(dup[0])])
                self._store_vectors(state, summary, rows, [(f, digest)], vec)
                summary.copied += 1
            else:
                remaining.append((f, digest))

        self._checkpoint_if_due(state, force=True)

        size = _model_image_size(self.encoder)
        total = len(remaining)
        if progress:
            progress("encode", 0, total)
        done = 0
        for start in range(0, total, self.batch_size):
            batch = remaining[start : start + self.batch_size]
            state["clean"] = True  # an interrupt here loses nothing already applied
            images, ok_items = [], []
            for f, digest in batch:
                try:
                    images.append(open_image(f.abspath, size=size, max_pixels=self.max_pixels))
                    ok_items.append((f, digest))
                except ImageError as exc:
                    state["clean"] = False
                    self._record_failure(state, summary, rows, f, digest, _strip_name(str(exc), f.abspath))
                    state["clean"] = True
            vecs = self._encode(images, ok_items, state, summary, rows)
            state["clean"] = False
            if vecs is not None and ok_items:
                self._store_vectors(state, summary, rows, ok_items, vecs)
                summary.encoded += len(ok_items)
            state["clean"] = True
            for im in images:
                im.close()
            done += len(batch)
            state["since_checkpoint"] += len(batch)
            if progress:
                progress("encode", done, total)
            self._checkpoint_if_due(state)
        state["clean"] = False

    def _encode(self, images: List[Any], items: List[Tuple[_Found, str]], state: Dict[str, Any],
                summary: UpdateSummary, rows: Dict[bytes, Any]) -> Optional[np.ndarray]:
        if not images:
            return None
        enc = self.encoder
        twin = isinstance(state["index"], _TwinIndex)

        def encode(ims: List[Any]) -> np.ndarray:
            if not twin:
                return np.asarray(enc.encode_images(ims), dtype=np.float32)
            joint, sim = enc.encode_images_all(ims)  # type: ignore[attr-defined]
            return np.concatenate([np.asarray(joint, np.float32), np.asarray(sim, np.float32)], axis=1)

        try:
            return encode(images)
        except Exception:
            if len(images) == 1:
                raise
        # a batch failed: encode one by one to find the file at fault
        vecs, keep = [], []
        for im, item in zip(images, items):
            try:
                vecs.append(encode([im])[0])
                keep.append(item)
            except Exception as exc:  # the model refused this image; record, go on
                self._record_failure(state, summary, rows, item[0], item[1], f"encoder failed: {exc}")
        items[:] = keep
        return np.stack(vecs) if vecs else None

    def _store_vectors(self, state: Dict[str, Any], summary: UpdateSummary, rows: Dict[bytes, Any],
                       items: List[Tuple[_Found, str]], vecs: np.ndarray) -> None:
        conn: sqlite3.Connection = state["conn"]
        index = state["index"]
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(items), -1)
        finite = np.isfinite(vecs).all(axis=1) & (np.linalg.norm(vecs, axis=1) > 0)
        keys = self._new_keys(state, len(items))
        old_keys = [rows[f.rel][3] for f, _ in items if f.rel in rows and rows[f.rel][3] is not None]
        if old_keys:
            index.remove(np.asarray(old_keys, dtype=np.uint64))
        good = [i for i in range(len(items)) if finite[i]]
        if good:
            index.add(np.asarray([keys[i] for i in good], dtype=np.uint64), vecs[good])
        for i, (f, digest) in enumerate(items):
            if not finite[i]:
                self._record_failure(state, summary, rows, f, digest, "encoder produced a NaN or zero vector")
                continue
            old = rows.get(f.rel)
            if old is None:
                summary.added += 1
            else:
                summary.updated += 1
            conn.execute(
                "INSERT OR REPLACE INTO files (path, size, mtime_ns, sha256, key, status, reason) "
                "VALUES (?, ?, ?, ?, ?, 'ok', NULL)",
                (f.rel, f.size, f.mtime_ns, digest, keys[i]),
            )
            rows[f.rel] = (f.size, f.mtime_ns, digest, keys[i], "ok")
        state["dirty"] = True

    def _record_failure(self, state: Dict[str, Any], summary: UpdateSummary, rows: Dict[bytes, Any],
                        f: _Found, digest: Optional[str], reason: str) -> None:
        old = rows.get(f.rel)
        if old is not None and old[3] is not None:
            state["index"].remove(np.asarray([old[3]], dtype=np.uint64))
        state["conn"].execute(
            "INSERT OR REPLACE INTO files (path, size, mtime_ns, sha256, key, status, reason) "
            "VALUES (?, ?, ?, ?, NULL, 'failed', ?)",
            (f.rel, f.size, f.mtime_ns, digest, reason),
        )
        rows[f.rel] = (f.size, f.mtime_ns, digest, None, "failed")
        summary.failed += 1
        summary.failures.append((_display(f.rel), reason))
        state["dirty"] = True

    def _checkpoint_if_due(self, state: Dict[str, Any], force: bool = False) -> None:
        elapsed = time.monotonic() - state["last_checkpoint"]
        min_gap = state.get("last_save_s", 0.0) * (1.0 / self.checkpoint_overhead - 1.0)
        due = force or elapsed >= min_gap and (
            state["since_checkpoint"] >= self.checkpoint_every or elapsed >= self.checkpoint_seconds
        )
        if due:
            self._checkpoint(state)


def _strip_name(msg: str, path: str) -> str:
    """ImageError messages start with the path; the row already names the file."""
    prefix = os.fsdecode(path) + ": "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _model_image_size(enc: Any) -> int:
    try:
        return int(enc.manifest.image.size)
    except AttributeError:
        return int(getattr(enc, "image_size", 224))
