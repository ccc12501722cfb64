"""The model bundle: a directory holding two ONNX encoders, a tokenizer and a manifest.

Layout (format version 1)::

    BUNDLE/
      leanclip.json     manifest (this module reads and writes it)
      image.onnx        pixels (n, 3, S, S) float32 -> embeddings (n, dim)
                        [, similarity embeddings (n, similarity_dim): optional second output]
      text.onnx         input_ids (n, L) int64 [, attention_mask (n, L) int64] -> (n, dim)
      tokenizer.json    Hugging Face tokenizers file

The manifest records every file's sha256, so a missing or altered file is refused at load
time rather than producing silently wrong embeddings.

Optional image-to-image vectors: ``image.similarity_output`` names a second output of
``image.onnx`` (``image.similarity_dim`` wide) holding vectors meant only for comparing images
with images (e.g. a classifier's pooled features), used for image-only queries; the first output
stays the joint text-image space. Both fields are absent from bundles without them, so such a
manifest is byte-for-byte a plain version-1 one with the same model id (and older leanclip
versions, which refuse unknown fields, refuse a bundle that has them rather than misreading it).

This module needs only the standard library: it is shared by the torch-side exporter and the
torch-free ``leanclip.Encoder``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from leanclip._fs import PathLike, atomic_write
from leanclip.errors import LeanclipError

FORMAT = "leanclip-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "leanclip.json"

# Sane ranges: a manifest outside them is a BundleError at load time, not an onnxruntime or
# memory failure later (a context length of 1,000,000 would be fed to the text model as is).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 2048
MIN_STD, MAX_STD = 1e-3, 10.0
MAX_CONTEXT_LENGTH = 8192
MAX_EMBEDDING_DIM = 65536

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BundleError(LeanclipError, ValueError):
    """A model bundle is missing, malformed, of another format version, or fails its checksums."""


@dataclass
class ImageSpec:
    """How images are prepared for ``image.onnx`` (open_clip's default preprocessing)."""

    file: str = "image.onnx"
    size: int = 224
    mean: List[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: List[float] = field(default_factory=lambda: list(CLIP_STD))
    # resize the shortest side to `size` with this filter, then center-crop size x size
    interpolation: str = "bicubic"
    input: str = "pixel_values"
    output: str = "image_embeds"
    # optional second output of image.onnx: image-to-image vectors (see the module docstring)
    similarity_output: Optional[str] = None
    similarity_dim: Optional[int] = None


@dataclass
class TextSpec:
    """How texts are prepared for ``text.onnx``."""

    file: str = "text.onnx"
    tokenizer: str = "tokenizer.json"
    context_length: int = 77
    pad_id: int = 0
    # ONNX input names fed by the encoder, in order: "input_ids" and optionally "attention_mask"
    inputs: List[str] = field(default_factory=lambda: ["input_ids"])
    output: str = "text_embeds"
    # "clip": open_clip's BPE (lower-cased, <start_of_text> ... <end_of_text>);
    # "wordpiece": BERT-style ([CLS] ... [SEP]) as in sentence-transformers models
    kind: str = "clip"


@dataclass
class Manifest:
    embedding_dim: int
    image: ImageSpec
    text: TextSpec
    name: str = "unnamed"
    source: str = ""
    precision: str = "fp32"  # "fp32" | "int8"
    files: Dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    extra: Dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def model_id(self) -> str:
        """A stable identity of the model: embeddings of two different ids never mix.

        It covers everything that changes an embedding: every file's checksum, the embedding
        size, the precision, and the whole image and text sections (preprocessing size, mean,
        std, interpolation; tokenizer, context length, padding, input and output names). The
        free-form ``name``, ``source`` and ``extra`` are left out (``name`` is its prefix). The
        optional image-to-image fields (``image.similarity_output``, ``image.similarity_dim``)
        count when set and are left out when absent, so a bundle without them keeps its id."""
        identity = {
            "files": self.files,
            "embedding_dim": self.embedding_dim,
            "precision": self.precision,
            "image": _without_unused_optional(asdict(self.image)),
            "text": asdict(self.text),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode())
        return f"{self.name}-{self.precision}-{digest.hexdigest()[:16]}"

    @property
    def has_similarity(self) -> bool:
        """Whether ``image.onnx`` has a second, image-to-image output."""
        return self.image.similarity_output is not None

    def to_json(self) -> str:
        data = asdict(self)
        # absent, not null, when unused: see the module docstring
        data["image"] = _without_unused_optional(data["image"])
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


_OPTIONAL_IMAGE_FIELDS = ("similarity_output", "similarity_dim")


def _without_unused_optional(image: Dict[str, Any]) -> Dict[str, Any]:
    """The image section without the optional fields that are unset (None)."""
    return {k: v for k, v in image.items() if not (k in _OPTIONAL_IMAGE_FIELDS and v is None)}


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def not_a_file(path: PathLike) -> str:
    """Why ``path`` is not a regular file, for a message: "missing", "a directory, not a file",
    "a FIFO (named pipe), not a file", ... ("" when it is one). Links are followed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    except ValueError:  # a NUL byte, or a lone surrogate the file system cannot take
        return "not a usable file name"
    kinds = (
        (stat.S_ISREG, ""),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    for test, what in kinds:
        if test(mode):
            return f"{what}, not a file" if what else ""
    return "not a regular file"


def write_manifest(bundle_dir: PathLike, manifest: Manifest) -> Path:
    """Checksum the bundle's files and write ``leanclip.json`` atomically. Returns its path."""
    root = Path(bundle_dir)
    names = [manifest.image.file, manifest.text.file, manifest.text.tokenizer]
    names += [n for n in manifest.files if n not in names]
    files = {}
    for name in names:
        path = root / name
        problem = not_a_file(path)
        if problem:
            what = "does not exist" if problem == "missing" else f"is {problem}"
            raise BundleError(f"cannot write manifest: bundle file {path} {what}")
        files[name] = sha256_file(path)
    manifest.files = files
    target = root / MANIFEST_NAME
    with atomic_write(target, "w") as fh:
        fh.write(manifest.to_json())
    return target


def _section(data: Dict[str, Any], key: str, cls: type, where: Path) -> Any:
    raw = data.get(key)
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: '{key}' must be an object")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise BundleError(f"{where}: unknown field(s) in '{key}': {sorted(unknown)}")
    return cls(**raw)


def _check_specs(manifest: Manifest, where: Path) -> None:
    """Types and ranges of the image and text sections: a wrong one fails here, by name."""

    def fail(field_name: str, expected: str, value: Any) -> None:
        raise BundleError(f"{where}: {field_name} must be {expected}, got {value!r}")

    def is_int(v: Any) -> bool:
        return type(v) is int

    def is_number(v: Any) -> bool:
        return type(v) in (int, float) and v == v and abs(v) != float("inf")

    image, text = manifest.image, manifest.text
    for name in ("file", "interpolation", "input", "output"):
        if not isinstance(getattr(image, name), str) or not getattr(image, name):
            fail(f"image.{name}", "a non-empty string", getattr(image, name))
    for name in ("file", "tokenizer", "output", "kind"):
        if not isinstance(getattr(text, name), str) or not getattr(text, name):
            fail(f"text.{name}", "a non-empty string", getattr(text, name))
    if not is_int(image.size) or not MIN_IMAGE_SIZE <= image.size <= MAX_IMAGE_SIZE:
        fail("image.size", f"an integer in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}", image.size)
    for name in ("mean", "std"):
        values = getattr(image, name)
        if not isinstance(values, list) or len(values) != 3 or not all(map(is_number, values)):
            fail(f"image.{name}", "a list of 3 finite numbers", values)
    if not all(0.0 <= v <= 1.0 for v in image.mean):
        fail("image.mean", "3 numbers in 0..1 (pixel values are scaled to 0..1 first)", image.mean)
    if not all(MIN_STD <= v <= MAX_STD for v in image.std):
        fail("image.std", f"3 numbers in {MIN_STD}..{MAX_STD}", image.std)
    if image.interpolation not in ("bicubic", "bilinear", "nearest", "lanczos"):
        fail("image.interpolation", "bicubic, bilinear, nearest or lanczos", image.interpolation)
    if (image.similarity_output is None) != (image.similarity_dim is None):
        fail(
            "image.similarity_output and image.similarity_dim",
            "both set or both absent",
            [image.similarity_output, image.similarity_dim],
        )
    if image.similarity_output is not None:
        if not isinstance(image.similarity_output, str) or not image.similarity_output:
            fail("image.similarity_output", "a non-empty string", image.similarity_output)
        if image.similarity_output == image.output:
            fail(
                "image.similarity_output",
                f"another output than image.output ({image.output!r})",
                image.similarity_output,
            )
        sim_dim = image.similarity_dim
        if not is_int(sim_dim) or not 1 <= int(sim_dim or 0) <= MAX_EMBEDDING_DIM:
            fail("image.similarity_dim", f"an integer in 1..{MAX_EMBEDDING_DIM}", sim_dim)
    if not is_int(text.context_length) or not 1 <= text.context_length <= MAX_CONTEXT_LENGTH:
        fail("text.context_length", f"an integer in 1..{MAX_CONTEXT_LENGTH}", text.context_length)
    if not is_int(text.pad_id) or not 0 <= text.pad_id < 2**31:
        fail("text.pad_id", "an integer in 0..2**31-1", text.pad_id)
    if (
        not isinstance(text.inputs, list)
        or not text.inputs
        or text.inputs[0] != "input_ids"
        or not set(text.inputs) <= {"input_ids", "attention_mask"}
        or len(set(text.inputs)) != len(text.inputs)
    ):
        fail("text.inputs", '["input_ids"] or ["input_ids", "attention_mask"]', text.inputs)
    if text.kind not in ("clip", "wordpiece"):
        fail("text.kind", '"clip" or "wordpiece"', text.kind)
    if manifest.precision not in ("fp32", "int8"):
        fail("precision", '"fp32" or "int8"', manifest.precision)
    if not 1 <= manifest.embedding_dim <= MAX_EMBEDDING_DIM:
        fail("embedding_dim", f"an integer in 1..{MAX_EMBEDDING_DIM}", manifest.embedding_dim)
    name = manifest.name
    if not name or len(name) > 100 or not name.isprintable():
        fail("name", "1 to 100 printable characters (it starts the model id)", name)


def read_manifest(bundle_dir: PathLike, verify: bool = True) -> Manifest:
    """Read and validate ``leanclip.json``; with ``verify``, check every file's sha256."""
    root = Path(bundle_dir)
    where = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"model bundle {root} is not a directory")
    if not where.is_file():
        raise BundleError(f"model bundle {root} has no {MANIFEST_NAME}")
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and Python's integer digit limit; deep nesting
        # raises RecursionError
        raise BundleError(f"{where}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{where}: not a leanclip bundle manifest (format != {FORMAT!r})")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # true == 1, but is no version
        raise BundleError(
            f"{where}: bundle format version {version!r} is not supported "
            f"(this leanclip reads version {FORMAT_VERSION})"
        )
    dim = data.get("embedding_dim")
    if type(dim) is not int or dim < 1:
        raise BundleError(f"{where}: embedding_dim must be an integer >= 1, got {dim!r}")
    files = data.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise BundleError(f"{where}: 'files' must map file names to sha256 strings")
    try:
        manifest = Manifest(
            embedding_dim=dim,
            image=_section(data, "image", ImageSpec, where),
            text=_section(data, "text", TextSpec, where),
            name=str(data.get("name", "unnamed")),
            source=str(data.get("source", "")),
            precision=str(data.get("precision", "fp32")),
            files=dict(files),
            extra=dict(data.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{where}: malformed manifest ({exc!r})") from None
    _check_specs(manifest, where)
    for name in (manifest.image.file, manifest.text.file, manifest.text.tokenizer):
        if name not in manifest.files:
            raise BundleError(f"{where}: no checksum recorded for {name}")
    for name, expected in manifest.files.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{where}: file name {name!r} leaves the bundle directory")
        problem = not_a_file(path)
        if problem == "missing":
            raise BundleError(f"model bundle {root} is missing {name}")
        if problem:
            raise BundleError(f"model bundle file {path} is {problem}")
        if verify and sha256_file(path) != expected:
            raise BundleError(
                f"model bundle file {path} does not match its sha256 in {MANIFEST_NAME} "
                "(altered or corrupted); re-export the bundle"
            )
    return manifest
