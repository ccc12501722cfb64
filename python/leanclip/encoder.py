"""The torch-free encoder: a model bundle run by onnxruntime.

Needs only numpy, Pillow, tokenizers and onnxruntime. Text and image embeddings come back as
L2-normalized float32 arrays of shape ``(n, dim)``.

Defined behaviour for awkward inputs:

* texts longer than the context length are truncated (CLIP: the end-of-text token is kept last,
  as open_clip does); the empty string is allowed and encodes as just the start and end tokens
  (CLIP) or ``[CLS] [SEP]`` (WordPiece), exactly as the training-side tokenizers do;
  a non-``str`` item raises ``TypeError`` naming its index; a bare ``str`` instead of a list
  raises ``TypeError`` (it would otherwise be read as a list of characters).
* images: files are opened by :func:`leanclip.images.load_image` (the one loader leanclip has;
  its docstring lists the rules): EXIF-rotated, converted to 8-bit RGB (16- and 32-bit grayscale
  scaled from their full range, float clipped to [0, 1], alpha dropped as open_clip does). A
  missing, empty, truncated, non-image, oversized (more than ``max_pixels``, a decompression
  bomb), pixel-less (0 x N) or absurdly thin file raises :class:`ImageLoadError` naming the file
  and the reason, so a caller can record it per file. A PIL image with no pixels raises it too.
* resizing is bounded by the output: an image whose resize stays within 16 Mpx (any photo) is
  resized exactly as open_clip does; for longer strips only the center crop is computed
  (Pillow's ``resize(box=...)``), so a 1 x 6000 image in memory costs no more than a square one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from leanclip._fs import PathLike
from leanclip.bundle import MANIFEST_NAME, BundleError, Manifest, read_manifest
from leanclip.clip_tokenizer import clip_clean
from leanclip.errors import LeanclipError
from leanclip.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_rgb

__all__ = [
    "Encoder",
    "EncodeError",
    "ImageLoadError",
    "BundleError",
    "QueryVector",
    "preprocess_image",
    "query_space",
]

ImageInput = Union[str, "os.PathLike[str]", Image.Image]

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Images whose full resize stays within this many pixels (48 MB as RGB) are resized exactly as
# open_clip does; beyond it (long thin strips) preprocess_image computes only the center crop.
_MAX_RESIZE_PIXELS = 16_000_000

# vector spaces of a bundle: "joint" (text and images, every bundle) and "similarity" (images
# only; bundles whose manifest declares image.similarity_output)
JOINT = "joint"
SIMILARITY = "similarity"
SPACES = (JOINT, SIMILARITY)


def query_space(term_kinds: Iterable[str], has_similarity: bool) -> str:
    """The space a query is searched in: ``"similarity"`` when every term is an image and the
    bundle has similarity vectors, else ``"joint"`` (any text term keeps the query in the space
    texts and images share, so ``text +img:x`` stays coherent)."""
    kinds = list(term_kinds)
    for k in kinds:
        if k not in ("text", "image"):
            raise ValueError(f"unknown query term kind {k!r} (expected 'text' or 'image')")
    if not kinds:
        raise ValueError("a query needs at least one term")
    return SIMILARITY if has_similarity and all(k == "image" for k in kinds) else JOINT


class EncodeError(LeanclipError, RuntimeError):
    """The bundle's ONNX model failed on a batch it should take (onnxruntime's own error, e.g.
    out of memory, in one line). A bundle that cannot run at all is refused earlier, as a
    :class:`BundleError`, by the check each ONNX session runs when it is created."""


def _first_line(exc: BaseException) -> str:
    """onnxruntime's message, one line: its reason without the "[ONNXRuntimeError] : 2 :" prefix."""
    text = " ".join(str(exc).split())
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class QueryVector(NamedTuple):
    """A unit query vector and the space (``"joint"`` or ``"similarity"``) it belongs to."""

    vector: np.ndarray
    space: str


def preprocess_image(
    img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"
) -> np.ndarray:
    """open_clip's eval transform in numpy: resize the shortest side to ``size`` (Pillow, as
    torchvision does for PIL images), center-crop ``size`` x ``size``, scale to [0, 1],
    normalize by mean/std. Returns float32 (3, size, size)."""
    try:
        resample = _FILTERS[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r} (known: {sorted(_FILTERS)})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageLoadError("<in-memory image>", f"image has no pixels ({w} x {h})")
    img = to_rgb(img)
    # torchvision.transforms.Resize(int): short side -> size, long side -> int(size * long / short)
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    if nw * nh <= _MAX_RESIZE_PIXELS:
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        img = img.crop((left, top, left + size, top + size))
    else:
        # a very long strip: resizing all of it first would cost memory in proportion to its
        # aspect ratio (a 1 x 6000 PNG would become 224 x 1,344,000 pixels). Pillow's box resize
        # computes only the center crop from the same source area (Pillow's arithmetic differs a
        # little: pixels are within a few 8-bit levels of the full resize), so work and memory
        # stay bounded by size x size.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        img = img.resize((size, size), resample, box=box)
    arr: np.ndarray = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


class Encoder:
    """Encode texts and images with a model bundle (see :mod:`leanclip.bundle`).

    ``threads``: onnxruntime intra-op threads (None: onnxruntime's default, one per core).
    ``spin``: let onnxruntime's idle threads busy-wait for the next call (its own default). Off
    here: an Encoder holds two sessions and shares the cores with the index search, and spinning
    threads of one steal the CPU from the next (docs/export.md has the measurements); turn it on
    for a process that only runs one tower back to back. ``providers``: onnxruntime execution providers (default CPU). ``verify``: check every file's
    sha256 against the manifest (``BundleError`` on a missing or altered file). The two ONNX
    sessions are created on first use, so a text-only search never loads the image model.
    """

    def __init__(
        self,
        bundle: PathLike,
        *,
        threads: Optional[int] = None,
        providers: Optional[Sequence[Any]] = None,
        verify: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        spin: bool = False,
    ) -> None:
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path, verify=verify)
        m = self.manifest
        self.dim: int = m.embedding_dim
        # image-to-image vectors (a second output of image.onnx), when the bundle has them
        self.has_similarity: bool = m.has_similarity
        self.similarity_dim: Optional[int] = m.image.similarity_dim
        self.model_id: str = m.model_id
        self.name: str = m.name
        self.max_pixels = int(max_pixels)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self.spin = bool(spin)
        if m.image.interpolation not in _FILTERS:
            raise BundleError(f"{self.path}: unknown image interpolation {m.image.interpolation!r}")
        if m.text.kind not in ("clip", "wordpiece"):
            raise BundleError(f"{self.path}: unknown text kind {m.text.kind!r}")
        import onnxruntime as ort

        available = ort.get_available_providers()
        self.providers: List[Any] = list(providers) if providers else ["CPUExecutionProvider"]
        for prov in self.providers:
            pname = prov[0] if isinstance(prov, tuple) else prov
            if pname not in available:
                raise ValueError(
                    f"onnxruntime execution provider {pname!r} is not available (available: {available})"
                )
        self._lock = threading.Lock()
        self._sessions: Dict[str, Any] = {}
        # a session that failed its self-check, by tower: raised again at once on the next use
        self._refused: Dict[str, str] = {}
        self._text_length: Optional[int] = None  # fixed sequence length of text.onnx, if any
        from tokenizers import Tokenizer

        tok_path = self.path / m.text.tokenizer
        try:
            self._tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:
            raise BundleError(f"{tok_path}: not a valid tokenizer.json ({exc})") from None
        self._tokenizer.enable_truncation(m.text.context_length)
        self._tokenizer.no_padding()
        self._vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if m.text.pad_id >= self._vocab_size:
            raise BundleError(
                f"{self.path}: text.pad_id {m.text.pad_id} is beyond the tokenizer's vocabulary "
                f"({self._vocab_size} ids: 0..{self._vocab_size - 1})"
            )

    # -- sessions ---------------------------------------------------------------------------

    def _session(self, which: str) -> Any:
        sess = self._sessions.get(which)
        if sess is not None:
            return sess
        with self._lock:
            if which in self._sessions:
                return self._sessions[which]
            if which in self._refused:
                raise BundleError(self._refused[which])
            import onnxruntime as ort

            m = self.manifest
            spec: Any = m.image if which == "image" else m.text
            path = self.path / spec.file
            so = ort.SessionOptions()
            if self.threads is not None:
                so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
            so.log_severity_level = 4  # its failures come back as our errors, not as log lines
            try:
                sess = ort.InferenceSession(str(path), so, providers=self.providers)
            except Exception as exc:
                raise BundleError(f"{path}: onnxruntime cannot load it ({exc})") from None
            names = [i.name for i in sess.get_inputs()]
            wanted = [spec.input] if which == "image" else list(spec.inputs)
            if sorted(names) != sorted(wanted):
                raise BundleError(f"{path}: ONNX inputs {names} do not match the manifest's {wanted}")
            outs = [o.name for o in sess.get_outputs()]
            if spec.output not in outs:
                raise BundleError(f"{path}: ONNX outputs {outs} lack the manifest's {spec.output!r}")
            if (
                which == "image"
                and m.image.similarity_output is not None
                and m.image.similarity_output not in outs
            ):
                raise BundleError(
                    f"{path}: ONNX outputs {outs} lack the manifest's similarity output "
                    f"{m.image.similarity_output!r}"
                )
            if which == "text":
                seq = sess.get_inputs()[0].shape[1]
                self._text_length = seq if isinstance(seq, int) else None
            try:
                self._self_check(which, sess, path)
            except BundleError as exc:
                self._refused[which] = str(exc)
                raise
            self._sessions[which] = sess
            return sess

    def _self_check(self, which: str, sess: Any, path: Path) -> None:
        """Run what the manifest declares through a new session once, cheaply: one black image of
        ``image.size`` pixels, or one short text row holding the tokenizer's largest id and
        ``pad_id``. A manifest the graph cannot take (an image size it has no shape for, a pad
        id or tokenizer beyond its vocabulary, another output width) is a :class:`BundleError`
        naming the bundle and the fields, here, rather than an onnxruntime error at the first
        real batch. (A ``context_length`` longer than the model's positions is not run here,
        at the cost of a full-length row: the first text that long is an :class:`EncodeError`.)"""
        m = self.manifest
        if which == "image":
            spec: Any = m.image
            declared = f"image.size {spec.size}"
            names = [spec.output] + ([str(spec.similarity_output)] if m.has_similarity else [])
            feeds = {spec.input: np.zeros((1, 3, spec.size, spec.size), dtype=np.float32)}
        else:
            spec = m.text
            top = self._vocab_size - 1
            declared = f"text.pad_id {spec.pad_id}, tokenizer ids up to {top}"
            ids = self._tokenizer.encode("").ids + [top]
            # a short row (a full-context one costs a real query's time): room for one pad
            width = self._text_length or min(spec.context_length, len(ids) + 1)
            ids = ids[-max(width - 1, 1) :]  # the largest id is the last: keep it
            row = np.full((1, width), spec.pad_id, dtype=np.int64)
            row[0, : len(ids)] = ids
            mask = np.zeros((1, width), dtype=np.int64)
            mask[0, : len(ids)] = 1
            names = [spec.output]
            both = {"input_ids": row, "attention_mask": mask}
            feeds = {k: both[k] for k in spec.inputs}
        try:
            got = sess.run(names, feeds)
        except Exception as exc:
            raise BundleError(
                f"{path}: the model cannot run what {self.path / MANIFEST_NAME} declares "
                f"({declared}): {_first_line(exc)}"
            ) from None
        self._check_and_normalize(got[0], 1, which)
        if len(got) > 1:
            self._check_and_normalize(got[1], 1, "image (similarity output)", spec.similarity_dim)

    def _run(self, which: str, names: List[str], feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """One batch through the ``which`` model; its failure is an :class:`EncodeError`."""
        sess = self._session(which)
        try:
            return list(sess.run(names, feeds))
        except Exception as exc:
            n = len(next(iter(feeds.values())))
            raise EncodeError(
                f"{self.path}: the {which} model failed on a batch of {n}: {_first_line(exc)}"
            ) from None

    def load(self) -> "Encoder":
        """Create both ONNX sessions now (otherwise they are created on first use)."""
        self._session("text")
        self._session("image")
        return self

    # -- text -------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids per text (truncated to the context length, unpadded)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a sequence of str, not a single str: wrap it in a list")
        items = list(texts)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"texts[{i}] is not valid UTF-8 text (lone surrogate at index {exc.start})"
                ) from None
        if self.manifest.text.kind == "clip":
            # open_clip unescapes HTML entities twice; the rest of its cleaning is in tokenizer.json
            items = [clip_clean(t) for t in items]
        return [e.ids for e in self._tokenizer.encode_batch(items)]

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, dim) float32, L2-normalized."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        self._session("text")  # fixes _text_length
        spec = self.manifest.text
        # sort by length so each batch pads little (exact: see leanclip.export docs)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = self._text_length or max(len(ids[i]) for i in chunk)
            arr = np.full((len(chunk), width), spec.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                arr[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            feeds = {"input_ids": arr, "attention_mask": mask}
            emb = self._run("text", [spec.output], {k: feeds[k] for k in spec.inputs})[0]
            out[chunk] = self._check_and_normalize(emb, len(chunk), "text")
        return out

    # -- images -----------------------------------------------------------------------------

    @staticmethod
    def load_image(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """An EXIF-rotated RGB image; raises :class:`ImageLoadError` naming the file and reason.

        A static method: ``Encoder.load_image(path)`` works without a bundle."""
        return load_image(path, max_pixels=max_pixels)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """(3, S, S) float32: the bundle's resize, center crop and normalization."""
        spec = self.manifest.image
        return preprocess_image(img, spec.size, spec.mean, spec.std, spec.interpolation)

    def encode_images(
        self, images: Sequence[ImageInput], batch_size: int = 32, *, kind: str = JOINT
    ) -> np.ndarray:
        """(n, dim) float32, L2-normalized, from file paths and/or PIL images.

        ``kind="joint"`` (default): vectors in the space shared with texts. ``kind="similarity"``:
        the bundle's image-to-image vectors, ``(n, similarity_dim)``; ``ValueError`` if the bundle
        has none (see :attr:`has_similarity`). A file that cannot be loaded raises
        :class:`ImageLoadError` (encode files one by one, or check them with :meth:`load_image`,
        to skip bad ones)."""
        if kind not in SPACES:
            raise ValueError(f"kind must be one of {SPACES}, got {kind!r}")
        if kind == SIMILARITY and not self.has_similarity:
            raise ValueError(
                f"bundle {self.path} has no image-to-image (similarity) vectors; "
                "use kind='joint' or check Encoder.has_similarity"
            )
        joint, sim = self._encode_images(images, batch_size, want_similarity=kind == SIMILARITY)
        return sim if kind == SIMILARITY else joint  # type: ignore[return-value]

    def encode_images_all(
        self, images: Sequence[ImageInput], batch_size: int = 32
    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``(joint, similarity)`` from one run of the image model: what an index stores per
        photo. ``similarity`` is None when the bundle has no similarity vectors."""
        return self._encode_images(images, batch_size, want_similarity=self.has_similarity)

    def _encode_images(
        self, images: Sequence[ImageInput], batch_size: int, want_similarity: bool
    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
            raise TypeError("images must be a sequence of paths or PIL images: wrap a single one in a list")
        items = list(images)
        for i, item in enumerate(items):
            if not isinstance(item, (str, os.PathLike, Image.Image)):
                raise TypeError(f"images[{i}] is {type(item).__name__}, not a path or PIL.Image.Image")
            if isinstance(item, Image.Image) and (item.width <= 0 or item.height <= 0):
                raise ImageLoadError(f"images[{i}]", f"image has no pixels ({item.width} x {item.height})")
        spec = self.manifest.image
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        sim_dim = int(spec.similarity_dim or 0)
        sim = np.zeros((len(items), sim_dim), dtype=np.float32) if want_similarity else None
        if not items:
            return out, sim
        names = [spec.output] + ([str(spec.similarity_output)] if want_similarity else [])
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pixels = np.stack(
                [
                    self.preprocess(
                        item
                        if isinstance(item, Image.Image)
                        else load_image(item, max_pixels=self.max_pixels)
                    )
                    for item in chunk
                ]
            )
            got = self._run("image", names, {spec.input: pixels})
            out[start : start + len(chunk)] = self._check_and_normalize(got[0], len(chunk), "image")
            if sim is not None:
                sim[start : start + len(chunk)] = self._check_and_normalize(
                    got[1], len(chunk), "image (similarity output)", sim_dim
                )
        return out, sim

    # -- queries ----------------------------------------------------------------------------

    def encode_query(self, terms: Sequence[Tuple[int, str, Any]]) -> QueryVector:
        """One unit query vector from signed terms ``(sign, kind, value)``: ``kind`` "text" (a
        str) or "image" (a path or PIL image), ``sign`` +1 or -1. Each term's unit vector is
        added with its sign, and the sum normalized. The space is chosen by :func:`query_space`:
        image-only queries use the similarity vectors when the bundle has them, anything with
        text uses the joint space."""
        items = list(terms)
        for i, t in enumerate(items):
            if not (isinstance(t, tuple) and len(t) == 3) or t[0] not in (1, -1):
                raise ValueError(f"terms[{i}] must be (sign +1/-1, 'text'|'image', value), got {t!r}")
        space = query_space([t[1] for t in items], self.has_similarity)
        if not any(t[0] > 0 for t in items):
            raise ValueError("a query needs at least one positive term")
        texts = [t[2] for t in items if t[1] == "text"]
        images = [t[2] for t in items if t[1] == "image"]
        tv = iter(self.encode_text(texts)) if texts else iter(())
        iv = iter(self.encode_images(images, kind=space)) if images else iter(())
        q = sum(t[0] * (next(tv) if t[1] == "text" else next(iv)) for t in items)
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0.0:
            raise ValueError("the query's terms cancel out (positive and negative terms are the same)")
        return QueryVector(np.asarray(q / norm, dtype=np.float32), space)

    # -- helpers ----------------------------------------------------------------------------

    def _check_and_normalize(
        self, emb: np.ndarray, n: int, which: str, dim: Optional[int] = None
    ) -> np.ndarray:
        dim = self.dim if dim is None else dim
        if emb.ndim != 2 or emb.shape != (n, dim):
            raise BundleError(f"{self.path}: {which} model returned shape {emb.shape}, expected ({n}, {dim})")
        emb = emb.astype(np.float32, copy=False)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.maximum(norms, np.float32(1e-12))

    def __repr__(self) -> str:
        return f"Encoder({str(self.path)!r}, model_id={self.model_id!r}, dim={self.dim})"
