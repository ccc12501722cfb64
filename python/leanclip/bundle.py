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
manifest is byte-for-byte a plain version-1 one (and older leanclip versions, which refuse
unknown fields, refuse a bundle that has them rather than misreading it). This module needs only the standard
library: it is shared by the torch-side exporter and the torch-free ``leanclip.Encoder``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

FORMAT = "leanclip-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "leanclip.json"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PathLike = Union[str, "os.PathLike[str]"]


class BundleError(ValueError):
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
        """A stable identity of the model: embeddings of two different ids never mix."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}={self.files[name]};".encode())
        return f"{self.name}-{self.precision}-{digest.hexdigest()[:16]}"

    @property
    def has_similarity(self) -> bool:
        """Whether ``image.onnx`` has a second, image-to-image output."""
        return self.image.similarity_output is not None

    def to_json(self) -> str:
        data = asdict(self)
        for key in _OPTIONAL_IMAGE_FIELDS:  # absent, not null, when unused: see the module docstring
            if data["image"].get(key) is None:
                data["image"].pop(key, None)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


_OPTIONAL_IMAGE_FIELDS = ("similarity_output", "similarity_dim")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: PathLike, manifest: Manifest) -> Path:
    """Checksum the bundle's files and write ``leanclip.json`` atomically. Returns its path."""
    root = Path(bundle_dir)
    names = [manifest.image.file, manifest.text.file, manifest.text.tokenizer]
    names += [n for n in manifest.files if n not in names]
    files = {}
    for name in names:
        path = root / name
        if not path.is_file():
            raise BundleError(f"cannot write manifest: bundle file {path} does not exist")
        files[name] = sha256_file(path)
    manifest.files = files
    target = root / MANIFEST_NAME
    fd, tmp = tempfile.mkstemp(prefix=".leanclip.json.", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a bundle is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _section(data: Dict[str, Any], key: str, cls: type, where: Path) -> Any:
    raw = data.get(key)
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: '{key}' must be an object")
    known = set(cls.__dataclass_fields__)
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
    if not is_int(image.size) or not 1 <= image.size <= 8192:
        fail("image.size", "an integer in 1..8192", image.size)
    for name in ("mean", "std"):
        values = getattr(image, name)
        if not isinstance(values, list) or len(values) != 3 or not all(map(is_number, values)):
            fail(f"image.{name}", "a list of 3 finite numbers", values)
    if any(v <= 0 for v in image.std):
        fail("image.std", "positive", image.std)
    if image.interpolation not in ("bicubic", "bilinear", "nearest", "lanczos"):
        fail("image.interpolation", "bicubic, bilinear, nearest or lanczos", image.interpolation)
    if (image.similarity_output is None) != (image.similarity_dim is None):
        fail("image.similarity_output and image.similarity_dim", "both set or both absent",
             [image.similarity_output, image.similarity_dim])
    if image.similarity_output is not None:
        if not isinstance(image.similarity_output, str) or not image.similarity_output:
            fail("image.similarity_output", "a non-empty string", image.similarity_output)
        if image.similarity_output == image.output:
            fail("image.similarity_output", f"another output than image.output ({image.output!r})",
                 image.similarity_output)
        sim_dim = image.similarity_dim
        if not is_int(sim_dim) or not 1 <= int(sim_dim or 0) <= 1_000_000:
            fail("image.similarity_dim", "an integer in 1..1000000", sim_dim)
    if not is_int(text.context_length) or not 1 <= text.context_length <= 1_000_000:
        fail("text.context_length", "an integer >= 1", text.context_length)
    if not is_int(text.pad_id) or text.pad_id < 0:
        fail("text.pad_id", "an integer >= 0", text.pad_id)
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
    if version != FORMAT_VERSION:
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
        if not path.is_file():
            raise BundleError(f"model bundle {root} is missing {name}")
        if verify and sha256_file(path) != expected:
            raise BundleError(
                f"model bundle file {path} does not match its sha256 in {MANIFEST_NAME} "
                "(altered or corrupted); re-export the bundle"
            )
    return manifest
