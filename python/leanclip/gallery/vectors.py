"""A query's vector: each term's vector (a text encoded, an image encoded or, for a photo of the
gallery, its stored vector), unit-length and signed, summed and normed; and the space it is
searched in (:func:`leanclip.encoder.query_space`: image-only queries of a gallery with
image-to-image vectors search those)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from leanclip.encoder import JOINT, SIMILARITY, query_space
from leanclip.gallery.errors import GalleryError, ModelMismatchError
from leanclip.gallery.model import model_image_size
from leanclip.gallery.query import Term
from leanclip.gallery.reader import Reader
from leanclip.images import load_image

__all__ = ["QueryVector", "query_vectors", "vector_query"]


@dataclass
class QueryVector:
    vector: np.ndarray  # unit length
    own: List[int]  # the gallery keys of its positive image terms (excluded from their results)
    space: str  # "joint", or "similarity" for the image-to-image index


def vector_query(reader: Reader, vector: np.ndarray) -> QueryVector:
    """A vector given as the query: it searches the image-to-image index when it has that
    index's width (and not the joint one's)."""
    qv = np.asarray(vector, dtype=np.float32)
    index, _, _ = reader.snapshots(similar=False)
    space = JOINT
    if qv.shape[-1] != index.dim:
        _, sim_index, _ = reader.snapshots()
        if sim_index is not None and qv.shape[-1] == sim_index.dim:
            space = SIMILARITY
    return QueryVector(qv, [], space)


def query_vectors(reader: Reader, queries: Sequence[Sequence[Term]], max_pixels: int) -> List[QueryVector]:
    """The vectors of several queries' terms; all their text terms go through one encoder call."""
    sources = _sources(reader, queries, max_pixels)
    # an indexed photo (kind "photo") is an image term too
    term_kinds = [["text" if t.kind == "text" else "image" for t in terms] for terms in queries]
    joint_index, sim_index, meta = reader.snapshots(similar=False)
    if int(meta.get("similarity_dim", 0) or 0) and any(
        SIMILARITY == query_space(k, True) for k in term_kinds
    ):
        joint_index, sim_index, meta = reader.snapshots()  # only image-only queries need it
    joint_dim = int(meta.get("dim", 0))
    texts = sorted({t.value for terms in queries for t in terms if t.kind == "text"})
    text_vecs: Dict[str, np.ndarray] = {}
    if texts:
        enc = reader.checked_encoder(meta)
        for text, tv in zip(texts, np.asarray(enc.encode_text(texts), dtype=np.float32)):
            text_vecs[text] = tv
    out = []
    for terms, kinds_of_terms, term_sources in zip(queries, term_kinds, sources):
        space = query_space(kinds_of_terms, sim_index is not None)
        index: Any = sim_index if space == SIMILARITY else joint_index
        dim = int(index.dim) if space == SIMILARITY else joint_dim
        vecs: List[np.ndarray] = []
        own: List[int] = []
        for t, source in zip(terms, term_sources):
            if source is None:
                v = text_vecs[t.value]
            elif isinstance(source, int):  # a photo of the gallery: its stored vector
                if source not in index:  # removed by an update since _sources looked
                    raise GalleryError(f"{t.value} left the gallery during the query; retry it")
                with reader.guard():
                    v = np.asarray(index.get([source]), dtype=np.float32)[0]
                if t.sign > 0:
                    own.append(source)
            else:  # an image file, decoded
                enc = reader.checked_encoder(meta)
                if space == SIMILARITY:
                    sim = enc.encode_images([source], kind=SIMILARITY)  # type: ignore[call-arg]
                    v = np.asarray(sim, dtype=np.float32)[0]
                else:
                    v = np.asarray(enc.encode_images([source]), dtype=np.float32)[0]
            if dim and v.shape[0] != dim:
                raise ModelMismatchError(f"query vector has dim {v.shape[0]}, gallery has {dim}")
            n = float(np.linalg.norm(v))
            vecs.append(t.sign * (v / n if n > 0 else v))
        q = np.sum(vecs, axis=0).astype(np.float32)
        n = float(np.linalg.norm(q))
        if not np.isfinite(n) or n == 0.0:
            raise GalleryError("the query's terms cancel out (positive and negative terms are the same)")
        out.append(QueryVector(q / n, own, space))
    return out


def _sources(reader: Reader, queries: Sequence[Sequence[Term]], max_pixels: int) -> List[List[Any]]:
    """Where each term's vector comes from: None for a text; for an image term, the key of its
    stored vector when it is a photo of the gallery (``photo`` terms always are), else the
    image file decoded. Read before the space is chosen: both indexes hold the same keys."""
    joint_index, _, meta = reader.snapshots(similar=False)
    out: List[List[Any]] = []
    for terms in queries:
        out.append([])
        for t in terms:
            key = None
            if t.kind == "photo":  # an indexed photo, by key: no file is read
                key = int(t.value)
                if key not in joint_index:
                    raise GalleryError(f"photo {key} is not in the gallery (any more)")
            elif t.kind == "image":
                key = reader.key_of(t.value)
            if t.kind == "text":
                out[-1].append(None)
            elif key is not None and key in joint_index:
                out[-1].append(key)
            else:
                enc = reader.checked_encoder(meta)
                out[-1].append(load_image(t.value, max_pixels=max_pixels, reduce_for=model_image_size(enc)))
    return out
