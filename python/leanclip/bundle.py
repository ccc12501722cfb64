"""The model bundle: a directory holding two ONNX encoders, a tokenizer and a manifest.

Layout (format version 1)::

    BUNDLE/
      leanclip.json     manifest (this module reads and writes it)
      image.onnx        pixels (n, 3, S, S) float32 -> embeddings (n, dim)
      text.onnx         input_ids (n, L) int64 [, attention_mask (n, L) int64] -> (n, dim)
      tokenizer.json    Hugging Face tokenizers file

The manifest records every file's sha256, so a missing or altered file is refused at load
time rather than producing silently wrong embeddings. This module needs only the standard
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{where}: not a leanclip bundle manifest (format != {FORMAT!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version!r} is not supported "
            f"(this leanclip reads version {FORMAT_VERSION})"
        )
    try:
        manifest = Manifest(
            embedding_dim=int(data["embedding_dim"]),
            image=_section(data, "image", ImageSpec, where),
            text=_section(data, "text", TextSpec, where),
            name=str(data.get("name", "unnamed")),
            source=str(data.get("source", "")),
            precision=str(data.get("precision", "fp32")),
            files=dict(data.get("files", {})),
            extra=dict(data.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{where}: malformed manifest ({exc!r})") from None
    if manifest.embedding_dim < 1:
        raise BundleError(f"{where}: embedding_dim must be >= 1, got {manifest.embedding_dim}")
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
