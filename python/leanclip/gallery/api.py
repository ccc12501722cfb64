"""The :class:`Gallery`: a photo folder kept in step with a SQLite store and a saved Index.

This module opens a gallery, reads it and searches it; the store's layout is in
:mod:`leanclip.gallery.store`, the update run and its commit protocol in
:mod:`leanclip.gallery.sync`, the query syntax in :mod:`leanclip.gallery.query`.
"""

from __future__ import annotations

import fnmatch
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Dict,
    List,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
    Union,
    runtime_checkable,
)

import numpy as np

from leanclip._engine import DTYPES
from leanclip._fs import PathLike
from leanclip.dates import parse_bound
from leanclip.encoder import SIMILARITY, query_space
from leanclip.gallery import duplicates as dup
from leanclip.gallery import kinds, texts
from leanclip.gallery import store as db
from leanclip.gallery.errors import GalleryError, ModelMismatchError, StaleSnapshot
from leanclip.gallery.query import Hit, Term, parse_query
from leanclip.gallery.store import StoreLayout
from leanclip.gallery.sync import (
    Progress,
    UpdateOptions,
    UpdateSummary,
    display,
    model_image_size,
    run_update,
)
from leanclip.images import DEFAULT_MAX_PIXELS, load_image


@runtime_checkable
class EncoderLike(Protocol):
    """What the gallery needs of a model (``leanclip.Encoder`` has it)."""

    dim: int
    model_id: str

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, images: Sequence[Any]) -> np.ndarray: ...


class Gallery:
    """A photo folder indexed for search. See :mod:`leanclip.gallery` for the store and protocol.

    ``model`` is an encoder object (anything with ``dim``, ``model_id``, ``encode_text``,
    ``encode_images``), a bundle directory, or None for the default model of
    ``leanclip.registry``. It is loaded only when first needed.
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
        index_kind: Optional[str] = None,
        nprobe: Optional[int] = None,
        recall: Optional[float] = None,
        ocr: Optional[bool] = None,
        video: Optional[bool] = None,
        auto_threshold: int = kinds.AUTO_IVF_THRESHOLD,
        ivf_train_at: Optional[int] = None,
    ) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise GalleryError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
        if index_kind is not None and index_kind not in kinds.INDEX_CHOICES:
            raise GalleryError(
                f"index kind must be one of {', '.join(map(repr, kinds.INDEX_CHOICES))}, got {index_kind!r}"
            )
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
            raise GalleryError(f"nprobe must be an integer >= 1, got {nprobe!r}")
        if recall is not None and (
            isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 < recall <= 1
        ):
            raise GalleryError(f"recall must be a number in (0, 1], got {recall!r}")
        self.recall = recall  # an IVF index's target recall@10 (tuned); None keeps the store's (new: 0.95)
        self.dtype = dtype  # vector storage precision; None keeps the store's (new stores: f32)
        # exact | ivf | auto (gallery.kinds); None keeps the store's (new stores: auto)
        self.index_kind = index_kind
        self.nprobe = nprobe  # IVF lists scanned per query; None: the index's own (set at indexing)
        self.ocr = ocr  # read the text in photos (leanclip.ocr); None keeps the store's choice
        self.video = video  # index video clips too (leanclip.video); None keeps the store's choice
        self.auto_threshold = int(auto_threshold)  # "auto" is IVF above this many photos
        if ivf_train_at is not None and (
            isinstance(ivf_train_at, bool) or not isinstance(ivf_train_at, int) or ivf_train_at < 1
        ):
            raise GalleryError(f"ivf_train_at must be an integer >= 1, got {ivf_train_at!r}")
        # an IVF index trains itself (chooses its layout) at this many vectors (None: IVFIndex's own)
        self.ivf_train_at = ivf_train_at
        self.layout = StoreLayout.of(root, store)
        self.root = self.layout.root
        if not self.root.is_dir():
            raise GalleryError(f"gallery folder {self.root} does not exist or is not a directory")
        self.store = self.layout.store
        self.db_path = self.layout.db_path
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
        self._cached_sim: Optional[Tuple[int, Any]] = None  # (generation, image-to-image Index)
        self._model_source = ""  # bundle path of the model, recorded so later runs reuse it

    # -- resources -------------------------------------------------------------------------

    @property
    def encoder(self) -> EncoderLike:
        if self._encoder is None:
            from leanclip import registry

            arg = self._model_arg
            if arg is None:
                # by default a gallery keeps the model it was indexed with
                recorded = self._recorded_model()
                if recorded and registry.is_bundle(recorded):
                    arg = recorded
            path = registry.resolve(arg)  # type: ignore[arg-type]
            self._model_source = str(path.absolute())
            self._encoder = registry.load_encoder(path)
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

    def _reader(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.exists():
                raise GalleryError(
                    f"{self.root} has no gallery yet (no {self.db_path}); run `leanclip index {self.root}`"
                )
            self._conn = db.open_reader(self.db_path)
            db.check_schema(self._conn, self.db_path)
        return self._conn

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

    # -- reading ---------------------------------------------------------------------------

    def info(self) -> Dict[str, Any]:
        """Counts and identity of the gallery (model id, generation, store)."""
        with self._lock:
            conn = self._reader()
            meta = db.read_meta(conn)
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        return {
            "root": str(self.root),
            "store": str(self.store),
            "model_id": meta.get("model_id", ""),
            "dim": int(meta.get("dim", 0)),
            "generation": int(meta.get("generation", 0)),
            "index": meta.get("index_kind", "exact"),  # the kind of the index file: exact or ivf
            "index_choice": meta.get("index", "auto"),  # what was asked for: exact, ivf or auto
            "ok": counts.get("ok", 0),
            "failed": counts.get("failed", 0),
            "pending": counts.get("pending", 0),
        }

    def failures(self) -> List[Tuple[str, str]]:
        """(name, reason) of every file recorded as failed."""
        with self._lock:
            rows = (
                self._reader()
                .execute("SELECT path, reason FROM files WHERE status='failed' ORDER BY path")
                .fetchall()
            )
        return [(display(bytes(p)), r or "") for p, r in rows]

    def files(self) -> List[Tuple[str, str, Optional[int]]]:
        """(name, status, key) of every row, in path order."""
        with self._lock:
            rows = self._reader().execute("SELECT path, status, key FROM files ORDER BY path").fetchall()
        return [(display(bytes(p)), s, k) for p, s, k in rows]

    def _snapshot(self) -> Tuple[int, Any, Dict[str, str]]:
        """The committed generation, its index (cached across calls) and the meta table."""
        from leanclip import Index, IndexFileError

        with self._lock:
            conn = self._reader()
            for _ in range(20):
                meta = db.read_meta(conn)
                gen = int(meta.get("generation", 0))
                if self._cached is not None and self._cached[0] == gen:
                    return gen, self._cached[1], meta
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
                        raise GalleryError(
                            f"the gallery's index file is damaged ({exc}); run `leanclip index {self.root}` "
                            "to rebuild it"
                        ) from None
                self._cached = (gen, index)
                return gen, index, meta
        raise GalleryError(f"index file for generation {gen} keeps disappearing in {self.store}")

    def _similarity_snapshot(self, gen: int, meta: Dict[str, str]) -> Optional[Any]:
        """The image-to-image index of generation ``gen`` (an exact Index, cached); None when
        the gallery has none (its model has no image-to-image vectors)."""
        from leanclip import Index, IndexFileError

        if gen == 0 or not int(meta.get("similarity_dim", 0) or 0):
            return None
        with self._lock:
            if self._cached_sim is not None and self._cached_sim[0] == gen:
                return self._cached_sim[1]
            try:
                sim = Index.load(os.fspath(self.layout.similar_path(gen)), mmap=True)
            except FileNotFoundError:
                if self.layout.index_path(gen).exists():
                    # a checkpoint removes index-<G> before similar-<G>: this one is just missing
                    raise GalleryError(
                        f"the gallery's image-to-image index {self.layout.similar_path(gen).name} is missing; "
                        f"run `leanclip index {self.root}` to rebuild it"
                    ) from None
                # a writer committed a newer generation and removed the files: the caller's
                # snapshot is stale (it re-reads the generation)
                raise StaleSnapshot() from None
            except IndexFileError as exc:
                raise GalleryError(
                    f"the gallery's image-to-image index is damaged ({exc}); run `leanclip index {self.root}` "
                    "to rebuild it"
                ) from None
            self._cached_sim = (gen, sim)
            return sim

    def _snapshots(self, similar: bool = True) -> Tuple[Any, Optional[Any], Dict[str, str]]:
        """The joint index, the image-to-image index (None without one, or unless ``similar``)
        and the meta of one committed generation."""
        with self._lock:
            for _ in range(20):
                gen, index, meta = self._snapshot()
                if not similar:
                    return index, None, meta
                try:
                    return index, self._similarity_snapshot(gen, meta), meta
                except StaleSnapshot:
                    if self._reader().in_transaction:
                        raise
                    time.sleep(0.05)  # a writer committed meanwhile: take the new generation
        raise GalleryError(f"the image-to-image index keeps disappearing in {self.store}")

    def _rows_for_keys(self, keys: Sequence[int]) -> Dict[int, bytes]:
        return db.rows_for_keys(self._reader(), keys)

    def _key_of(self, image: PathLike) -> Optional[int]:
        """The key of ``image`` if it is an unchanged indexed file of this gallery."""
        try:
            real = Path(os.path.realpath(image))
            rel = real.relative_to(Path(os.path.realpath(self.root)))
            st = os.stat(real)
        except (ValueError, OSError):
            return None
        rel_bytes = os.fsencode(rel.as_posix())
        row = db.ok_row(self._reader(), rel_bytes)
        if row is not None and row.key is not None and row.same_file(st):
            return row.key
        return None

    def key_of_name(self, name: str) -> Optional[int]:
        """The key of the indexed photo whose path relative to the root is ``name`` ('/'
        separated), from the database alone: no file is opened or even looked at."""
        if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name:
            return None
        if any(part in ("", ".", "..") for part in name.split("/")):
            return None
        try:
            rel = os.fsencode(name)
        except UnicodeError:
            return None
        with self._lock:
            row = db.ok_row(self._reader(), rel)
        return row.key if row is not None else None

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

        A query made only of images (``img:`` / photo terms) gets an image-to-image vector when
        the gallery has them (its length is then the model's ``similarity_dim``; ``search``
        routes it there)."""
        vec, own, _ = self._query_vectors([query])[0]
        return vec, own

    def _query_vectors(
        self, queries: Sequence[Union[str, Sequence[Term]]]
    ) -> List[Tuple[np.ndarray, List[int], str]]:
        """(vector, own keys, space) of several queries; all their text terms go through one
        encoder call. ``space`` is "similarity" for image-only queries of a gallery with
        image-to-image vectors (:func:`leanclip.encoder.query_space`), else "joint"."""
        parsed = [parse_query(q) if isinstance(q, str) else list(q) for q in queries]
        # an indexed photo (kind "photo") is an image term too
        term_kinds = [["text" if t.kind == "text" else "image" for t in terms] for terms in parsed]
        joint_index, sim_index, meta = self._snapshots(similar=False)
        if int(meta.get("similarity_dim", 0) or 0) and any(
            SIMILARITY == query_space(k, True) for k in term_kinds
        ):
            joint_index, sim_index, meta = self._snapshots()  # only image-only queries need it
        joint_dim = int(meta.get("dim", 0))
        texts = sorted({t.value for terms in parsed for t in terms if t.kind == "text"})
        text_vecs: Dict[str, np.ndarray] = {}
        if texts:
            enc = self._check_model(meta)
            for text, tv in zip(texts, np.asarray(enc.encode_text(texts), dtype=np.float32)):
                text_vecs[text] = tv
        out = []
        for terms, kinds_of_terms in zip(parsed, term_kinds):
            space = query_space(kinds_of_terms, sim_index is not None)
            index: Any = sim_index if space == SIMILARITY else joint_index
            dim = int(index.dim) if space == SIMILARITY else joint_dim
            vecs: List[np.ndarray] = []
            own_keys: List[int] = []
            for t in terms:
                if t.kind == "text":
                    v = text_vecs[t.value]
                elif t.kind == "photo":  # an indexed photo, by key: its stored vector, no file read
                    photo = int(t.value)
                    if photo not in index:
                        raise GalleryError(f"photo {photo} is not in the gallery (any more)")
                    v = np.asarray(self._read_index(index.get, [photo]), dtype=np.float32)[0]
                    if t.sign > 0:
                        own_keys.append(photo)
                else:
                    key = self._key_of(t.value)
                    if key is not None and key in index:
                        v = np.asarray(self._read_index(index.get, [key]), dtype=np.float32)[0]
                        if t.sign > 0:
                            own_keys.append(key)
                    else:
                        enc = self._check_model(meta)
                        size = model_image_size(enc)
                        im = load_image(t.value, max_pixels=self.max_pixels, reduce_for=size)
                        if space == SIMILARITY:
                            v = np.asarray(
                                enc.encode_images([im], kind=SIMILARITY),  # type: ignore[call-arg]
                                dtype=np.float32,
                            )[0]
                        else:
                            v = np.asarray(enc.encode_images([im]), dtype=np.float32)[0]
                if dim and v.shape[0] != dim:
                    raise ModelMismatchError(f"query vector has dim {v.shape[0]}, gallery has {dim}")
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
        after: Union[str, int, None] = None,
        before: Union[str, int, None] = None,
        sort: str = "score",
        kind: Optional[str] = None,
    ) -> List[Hit]:
        """Top-``k`` files for a query string (see module docstring), terms, or a vector.

        ``paths``: glob patterns on the file name relative to the root (``*`` matches across
        folders); a file must match one. ``min_score``: drop hits scoring below it.
        ``after`` / ``before``: capture dates (``2024``, ``2024-07``, ``2024-07-14``, or wall
        seconds; :func:`leanclip.dates.parse_bound`): only photos taken at or after the start
        of ``after`` and before the start of ``before``. ``sort``: ``"score"`` (best first) or
        ``"date"`` (the same hits, newest first). ``kind``: ``"photo"`` or ``"video"`` (frames of
        clips) only. ``text:"..."`` terms keep the photos whose
        text (``--ocr``) has those words; a query of text terms alone ranks by text relevance.
        Image terms that are files of this gallery are excluded from their own results.
        """
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        terms: Optional[List[Term]] = None
        if isinstance(query, str):
            terms = parse_query(query)
        elif not isinstance(query, np.ndarray):
            terms = list(query)
        filt = self._filter(paths, after, before, sort, [t for t in terms or [] if t.kind == "ocr"], kind)
        if terms is not None and all(t.kind == "ocr" for t in terms):
            return self._text_search(filt, k, min_score)
        if isinstance(query, np.ndarray):
            qv = np.asarray(query, dtype=np.float32)
            own: List[int] = []
            index, _, _ = self._snapshots(similar=False)
            space = "joint"
            if qv.shape[-1] != index.dim:
                # a vector of the image-to-image width (and not the joint one) searches that index
                _, sim_index, _ = self._snapshots()
                if sim_index is not None and qv.shape[-1] == sim_index.dim:
                    space = "similarity"
        else:
            qv, own, space = self._query_vectors([[t for t in terms or [] if t.kind != "ocr"]])[0]
        return self._search_vectors(qv[None, :], [own if exclude_self else []], k, min_score, filt, space)[0]

    def search_batch(
        self,
        queries: Sequence[Union[str, Sequence[Term]]],
        k: int = 10,
        *,
        min_score: Optional[float] = None,
        paths: Optional[Sequence[str]] = None,
    ) -> List[List[Hit]]:
        """``search`` for many queries at once: one encoder call and one index search for all
        (several times the throughput of single queries; the server batches concurrent
        requests). Queries with ``text:`` terms are answered one by one."""
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        parsed = [parse_query(q) if isinstance(q, str) else list(q) for q in queries]
        out: List[List[Hit]] = [[] for _ in parsed]
        plain = [i for i, terms in enumerate(parsed) if not any(t.kind == "ocr" for t in terms)]
        for i in sorted(set(range(len(parsed))) - set(plain)):
            out[i] = self.search(parsed[i], k, min_score=min_score, paths=paths)
        if not plain:
            return out
        vecs = self._query_vectors([parsed[i] for i in plain])
        filt = self._filter(paths, None, None, "score", [])
        for space in ("joint", "similarity"):  # one index search per space
            idx = [j for j, v in enumerate(vecs) if v[2] == space]
            if idx:
                hits = self._search_vectors(
                    np.stack([vecs[j][0] for j in idx]), [vecs[j][1] for j in idx], k, min_score, filt, space
                )
                for j, h in zip(idx, hits):
                    out[plain[j]] = h
        return out

    def _filter(
        self,
        paths: Optional[Sequence[str]],
        after: Union[str, int, None],
        before: Union[str, int, None],
        sort: str,
        text_terms: Sequence[Term],
        kind: Optional[str] = None,
    ) -> "_Filter":
        if sort not in ("score", "date"):
            raise GalleryError(f"sort must be 'score' or 'date', got {sort!r}")
        if kind not in (None, "", "photo", "video"):
            raise GalleryError(f"kind must be 'photo' or 'video', got {kind!r}")
        lo, hi = _bound(after, "after"), _bound(before, "before")
        filt = _Filter(list(paths or []), lo, hi, sort, kind=kind or None)
        if lo is not None or hi is not None or sort == "date" or text_terms:
            with self._lock:
                if not db.has_dates(self._reader()):
                    raise GalleryError(
                        "this gallery has no capture dates or text yet (indexed by an older leanclip); "
                        f"run `leanclip index {self.root}` to add them"
                    )
        if text_terms:
            filt.words = [t.value for t in text_terms if t.sign > 0]
            with self._lock:
                filt.allowed, filt.banned = texts.matching_keys(
                    self._reader(), filt.words, [t.value for t in text_terms if t.sign < 0]
                )
        return filt

    def _text_search(self, filt: "_Filter", k: int, min_score: Optional[float]) -> List[Hit]:
        """A query of ``text:`` terms alone: every photo whose text matches, score 1.0, in the
        order they were indexed (a negative-only query has nothing to rank: no hits)."""
        if not filt.allowed:
            return []
        keys = sorted(filt.allowed)
        with self._lock:
            rows = db.hit_rows(self._reader(), keys)
        hits: List[Hit] = []
        for key in keys:
            if min_score is not None and 1.0 < min_score:
                break
            hit = self._hit(key, 1.0, rows, filt)
            if hit is not None:
                hits.append(hit)
                if len(hits) == k:
                    break
        return self._finish(hits, filt)

    def _hit(
        self,
        key: int,
        score: float,
        rows: Dict[int, Tuple[bytes, Optional[int], Optional[int]]],
        filt: "_Filter",
    ) -> Optional[Hit]:
        """The hit for ``key`` if its row exists and passes the filter, else None."""
        row = rows.get(int(key))
        if row is None:
            return None
        rel, taken, ms = row
        if (filt.allowed is not None and key not in filt.allowed) or key in filt.banned:
            return None
        if filt.kind is not None and (ms is None) != (filt.kind == "photo"):
            return None
        if filt.after is not None and (taken is None or taken < filt.after):
            return None
        if filt.before is not None and (taken is None or taken >= filt.before):
            return None
        name = display(rel)
        if filt.paths and not any(fnmatch.fnmatchcase(name, p) for p in filt.paths):
            return None
        t = None if ms is None else ms / 1000.0
        return Hit(self.root / os.fsdecode(rel), name, float(score), int(key), taken, None, t)

    def _finish(self, hits: List[Hit], filt: "_Filter") -> List[Hit]:
        """The matched text of each hit (for a query with text terms), and the date order."""
        if filt.words and hits:
            with self._lock:
                found = texts.bodies(self._reader(), [h.key for h in hits])
            for h in hits:
                if h.key in found:
                    h.text = texts.highlight(found[h.key], filt.words)
        if filt.sort == "date":
            hits.sort(key=lambda h: (h.taken is None, -(h.taken or 0)))
        return hits

    def _search_vectors(
        self,
        qv: np.ndarray,
        excludes: List[List[int]],
        k: int,
        min_score: Optional[float],
        filt: "_Filter",
        space: str = "joint",
    ) -> List[List[Hit]]:
        index, sim_index, _ = self._snapshots(similar=space == "similarity")
        if space == "similarity":
            if sim_index is None:
                raise GalleryError("the gallery's image-to-image index went away during the query; retry it")
            index = sim_index
        total = len(index)
        if total == 0:
            return [[] for _ in excludes]
        results: List[Optional[List[Hit]]] = [None] * len(excludes)
        todo = list(range(len(excludes)))
        want = k + max(len(e) for e in excludes)
        while todo:
            kk = min(total, want)
            keys, scores = self._read_index(index.search, qv[todo], kk)
            keys, scores = np.asarray(keys), np.asarray(scores)
            with self._lock:
                rows = db.hit_rows(self._reader(), np.unique(keys).tolist())
            unfinished = []
            for row_i, qi in enumerate(todo):
                hits: List[Hit] = []
                below = False
                skip = set(excludes[qi])
                for key, score in zip(keys[row_i].tolist(), scores[row_i].tolist()):
                    if min_score is not None and score < min_score:
                        below = True
                        break
                    if key in skip:  # the query image
                        continue
                    hit = self._hit(int(key), score, rows, filt)  # None: removed since, or filtered
                    if hit is None:
                        continue
                    hits.append(hit)
                    if len(hits) == k:
                        break
                if len(hits) == k or below or kk >= total:
                    results[qi] = hits
                else:  # filters left too few: look deeper
                    unfinished.append(qi)
            todo = unfinished
            want = kk * 4
        return [self._finish(r, filt) if r is not None else [] for r in results]

    def similar(
        self, image: PathLike, k: int = 10, *, extra: Union[str, Sequence[Term]] = (), **kw: Any
    ) -> List[Hit]:
        """Files most like ``image`` (a path; reuses its stored vector if it is in the gallery).

        Searches the image-to-image vectors when the gallery has them (a model with
        ``has_similarity``) and ``extra`` has no text, else the joint ones; scores are cosines
        of that space. ``extra``: more terms, as query syntax (``"+sunset -people"``) or :class:`Term` s;
        other keywords as for :meth:`search`."""
        if isinstance(extra, str):
            more = parse_query("+x " + extra)[1:] if extra.strip() else []
        else:
            more = list(extra)
        return self.search([Term(1, "image", os.fspath(image)), *more], k, **kw)

    def duplicates(self, threshold: Optional[float] = None) -> Tuple[Optional[float], List[List[Hit]]]:
        """Groups of near-duplicate photos (bursts, edited copies, re-saved files), largest
        first, and the threshold used: ``threshold`` (one cosine in the image-to-image space),
        or when None (returned as None) the calibrated per-photo rule of
        :mod:`leanclip.gallery.duplicates`. Each hit's score is its best score with another
        photo of its group. Nothing is deleted."""
        if threshold is not None and not (-1.0 <= float(threshold) <= 1.0):
            raise GalleryError(f"the duplicate threshold is a cosine from -1 to 1, got {threshold}")
        with self._lock:
            conn = self._reader()
            if not db.has_dates(conn):
                raise GalleryError(
                    "this gallery has no near-duplicate pairs yet (indexed by an older leanclip); "
                    f"run `leanclip index {self.root}` to find them"
                )
            floor = max(float(threshold), dup.FLOOR) if threshold is not None else dup.LOOK_FLOOR
            look = "look" if db.has_looks(conn) else "NULL"  # a version 3 store not updated yet
            got = conn.execute(
                "SELECT a, b, score, coalesce(da.background, -1), coalesce(db.background, -1), "
                f"coalesce({look}, 'nan') FROM near LEFT JOIN near_done da ON da.key = a "
                "LEFT JOIN near_done db ON db.key = b WHERE score >= ?",
                (floor,),
            ).fetchall()
            pairs = np.asarray(got, dtype=np.float64).reshape(-1, 6)
            if threshold is None:
                pairs = pairs[dup.calibrated(pairs[:, 2], pairs[:, 3], pairs[:, 4], pairs[:, 5])]
            a, b = pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64)
            groups = dup.components(a, b)
            rows = db.hit_rows(conn, [k for g in groups for k in g])
        best: Dict[int, float] = {}
        order = np.argsort(pairs[:, 2])  # ascending: the last write per key is its best
        for x, y, sc in pairs[order][:, :3].tolist():
            best[int(x)] = best[int(y)] = sc
        out: List[List[Hit]] = []
        everything = _Filter([])
        for g in groups:
            hits = [h for h in (self._hit(key, best.get(key, 0.0), rows, everything) for key in g) if h]
            if len(hits) > 1:
                out.append(sorted(hits, key=lambda h: h.name))
        return (None if threshold is None else float(threshold)), out

    def check(self) -> Tuple[List[int], List[int]]:
        """Consistency check: (keys of ok rows missing from the index, index keys without a row)."""
        with self._lock:
            conn = self._reader()
            for _ in range(50):
                conn.execute("BEGIN")  # one read snapshot for the generation and the rows
                try:
                    self._cached = None
                    self._cached_sim = None
                    gen, index, meta = self._snapshot()
                    sim_index = self._similarity_snapshot(gen, meta)
                    rows = {int(k) for (k,) in conn.execute("SELECT key FROM files WHERE status='ok'")}
                    if db.has_dates(conn):  # the frames of video clips have keys of their own
                        rows |= {int(k) for (k,) in conn.execute("SELECT key FROM frames")}
                    break
                except StaleSnapshot:
                    continue
                finally:
                    conn.execute("COMMIT")
            else:
                raise GalleryError(f"the gallery in {self.store} changes too fast to check")
        keys = {int(k) for k in np.asarray(index.keys()).tolist()}
        if sim_index is not None:  # the image-to-image index must hold exactly the same keys
            sim_keys = {int(k) for k in np.asarray(sim_index.keys()).tolist()}
            return sorted(rows - (keys & sim_keys)), sorted((keys | sim_keys) - rows)
        return sorted(rows - keys), sorted(keys - rows)

    # -- writing ---------------------------------------------------------------------------

    def update(self, progress: Optional[Progress] = None) -> UpdateSummary:
        """Bring the store in step with the folder (see :mod:`leanclip.gallery.sync`). Returns
        counts; ``progress(stage, done, total)`` is called as it goes."""
        enc = self.encoder  # loads the model first: its bundle path is recorded
        try:
            return run_update(self.layout, enc, self.update_options(), progress)
        finally:
            self._forget_snapshot()

    def update_options(self) -> UpdateOptions:
        """The :class:`~leanclip.gallery.sync.UpdateOptions` of this gallery's keywords."""
        return UpdateOptions(
            dtype=self.dtype,
            index_kind=self.index_kind,
            recall=self.recall,
            auto_threshold=self.auto_threshold,
            ivf_train_at=self.ivf_train_at,
            batch_size=self.batch_size,
            checkpoint_every=self.checkpoint_every,
            checkpoint_seconds=self.checkpoint_seconds,
            checkpoint_overhead=self.checkpoint_overhead,
            max_pixels=self.max_pixels,
            model_source=self._model_source,
            ocr=self.ocr,
            video=self.video,
        )

    def _read_index(self, call: Any, *args: Any) -> Any:
        """Run ``call(*args)`` on the cached index; the engine raises IndexFileError when the
        mapped file changed underneath it (truncated, rewritten in place): drop the cache, so
        the next query maps the file afresh, and say what to do."""
        from leanclip import IndexFileError

        try:
            return call(*args)
        except IndexFileError as exc:
            self._forget_snapshot()
            raise GalleryError(
                f"the gallery's index file changed or is damaged ({exc}); run `leanclip index {self.root}` "
                "to rebuild it"
            ) from None

    def _forget_snapshot(self) -> None:
        with self._lock:
            self._cached = None
            self._cached_sim = None


@dataclass
class _Filter:
    """What a hit must pass besides its score: path globs, a capture-date range, text terms."""

    paths: List[str]
    after: Optional[int] = None  # wall seconds, inclusive
    before: Optional[int] = None  # wall seconds, exclusive
    sort: str = "score"
    words: List[str] = field(default_factory=list)  # the positive text terms
    allowed: Optional[Set[int]] = None  # keys whose text matches the positive text terms
    banned: Set[int] = field(default_factory=set)  # keys whose text matches a negative one
    kind: Optional[str] = None  # "photo" or "video" (frames of clips) only


def _bound(value: Union[str, int, None], what: str) -> Optional[int]:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise GalleryError(f"--{what} must be a date, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return parse_bound(str(value))
    except ValueError as exc:
        raise GalleryError(f"--{what}: {exc}") from None
