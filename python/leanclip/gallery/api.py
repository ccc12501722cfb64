"""The :class:`Gallery`: a photo folder kept in step with a SQLite store and a saved Index.

This module is the gallery's face: it opens a gallery, reads it, and runs a search as one pass
down through the modules below it: the query parsed (:mod:`~leanclip.gallery.query`), its
``text:`` terms and keywords made a filter (:mod:`~leanclip.gallery.filters`), its other terms
one vector (:mod:`~leanclip.gallery.vectors`), the vector searched to hits
(:mod:`~leanclip.gallery.hits`); what the reads share (connection, cached indexes, model) is a
:class:`~leanclip.gallery.reader.Reader`. ``update()`` is :func:`leanclip.gallery.sync.run_update`.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from leanclip._engine import DTYPES
from leanclip._fs import PathLike
from leanclip._pool import default_decode_threads
from leanclip.gallery import duplicates as dup
from leanclip.gallery import kinds
from leanclip.gallery import store as db
from leanclip.gallery.errors import GalleryError, StaleSnapshot
from leanclip.gallery.filters import Filter, make_filter
from leanclip.gallery.hits import hit, text_hits, vector_hits
from leanclip.gallery.model import EncoderLike
from leanclip.gallery.query import Hit, Term, parse_query
from leanclip.gallery.reader import Reader
from leanclip.gallery.store import StoreLayout, display
from leanclip.gallery.sync import Progress, UpdateOptions, UpdateSummary, run_update
from leanclip.gallery.vectors import query_vectors, vector_query
from leanclip.images import DEFAULT_MAX_PIXELS

__all__ = ["EncoderLike", "Gallery"]


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
        decode_threads: Optional[int] = None,
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
        if decode_threads is not None and (
            isinstance(decode_threads, bool) or not isinstance(decode_threads, int) or decode_threads < 1
        ):
            raise GalleryError(f"decode_threads must be an integer >= 1, got {decode_threads!r}")
        # threads decoding photos while the encoder runs (1: one by one); None: the cores, at most 4
        self.decode_threads = default_decode_threads() if decode_threads is None else decode_threads
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.checkpoint_seconds = float(checkpoint_seconds)
        # a checkpoint rewrites the whole index file: they are spaced so that saving takes at
        # most this fraction of the run (1.0: no spacing beyond checkpoint_every / _seconds)
        self.checkpoint_overhead = min(1.0, max(1e-3, float(checkpoint_overhead)))
        self.max_pixels = int(max_pixels)
        # the connection, the committed indexes (cached) and the model, shared by every read
        self._read = Reader(self.layout, model, nprobe)

    # -- resources -------------------------------------------------------------------------

    @property
    def encoder(self) -> EncoderLike:
        return self._read.encoder

    @property
    def nprobe(self) -> Optional[int]:
        """IVF lists scanned per query; None: the index's own (set at indexing)."""
        return self._read.nprobe

    @nprobe.setter
    def nprobe(self, value: Optional[int]) -> None:
        self._read.nprobe = value

    @property
    def _lock(self) -> Any:
        """Held around every use of the read connection (``_reader()``)."""
        return self._read.lock

    def exists(self) -> bool:
        return self._read.exists()

    def _reader(self) -> sqlite3.Connection:
        return self._read.connection()

    def _snapshot(self) -> Tuple[int, Any, Dict[str, str]]:
        """The committed generation, its index (cached across calls) and the meta table."""
        return self._read.snapshot()

    def _forget_snapshot(self) -> None:
        self._read.forget()

    def close(self) -> None:
        self._read.close()

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

    def query_vector(self, query: Union[str, Sequence[Term]]) -> Tuple[np.ndarray, List[int]]:
        """The unit query vector of a query string or terms, and gallery keys of its image terms.

        A query made only of images (``img:`` / photo terms) gets an image-to-image vector when
        the gallery has them (its length is then the model's ``similarity_dim``; ``search``
        routes it there)."""
        terms = parse_query(query) if isinstance(query, str) else list(query)
        q = query_vectors(self._read, [terms], self.max_pixels)[0]
        return q.vector, q.own

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
        # the query goes one way: parsed (query), its text: terms to a filter (filters), the
        # other terms to one vector (vectors), the vector to hits (hits)
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        terms: Optional[List[Term]] = None
        if isinstance(query, str):
            terms = parse_query(query)
        elif not isinstance(query, np.ndarray):
            terms = list(query)
        filt = make_filter(
            self._read, paths, after, before, sort, [t for t in terms or [] if t.kind == "ocr"], kind
        )
        if terms is not None and all(t.kind == "ocr" for t in terms):
            return text_hits(self._read, filt, k, min_score)
        if terms is None:
            q = vector_query(self._read, np.asarray(query))
        else:
            q = query_vectors(self._read, [[t for t in terms if t.kind != "ocr"]], self.max_pixels)[0]
        if not exclude_self:
            q.own = []
        return vector_hits(self._read, [q], k, min_score, filt)[0]

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
        vecs = query_vectors(self._read, [parsed[i] for i in plain], self.max_pixels)
        filt = make_filter(self._read, paths, None, None, "score", [])
        for i, hits in zip(plain, vector_hits(self._read, vecs, k, min_score, filt)):
            out[i] = hits
        return out

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
        everything = Filter([])
        for g in groups:
            hits = [h for h in (hit(self._read, key, best.get(key, 0.0), rows, everything) for key in g) if h]
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
                    self._read.forget()
                    gen, index, meta = self._read.snapshot()
                    sim_index = self._read.similarity_index(gen, meta)
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
            self._read.forget()

    def update_options(self) -> UpdateOptions:
        """The :class:`~leanclip.gallery.sync.UpdateOptions` of this gallery's keywords."""
        return UpdateOptions(
            dtype=self.dtype,
            index_kind=self.index_kind,
            recall=self.recall,
            auto_threshold=self.auto_threshold,
            ivf_train_at=self.ivf_train_at,
            batch_size=self.batch_size,
            decode_threads=self.decode_threads,
            checkpoint_every=self.checkpoint_every,
            checkpoint_seconds=self.checkpoint_seconds,
            checkpoint_overhead=self.checkpoint_overhead,
            max_pixels=self.max_pixels,
            model_source=self._read.model_source,
            ocr=self.ocr,
            video=self.video,
        )
