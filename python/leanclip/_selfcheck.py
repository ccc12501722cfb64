"""What export and quantization share: the self-check that an ONNX bundle computes what its
source computes, and the tokenization it feeds (the Encoder's steps, without torch).

Needs numpy, onnxruntime and tokenizers (the base install).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from leanclip.bundle import MANIFEST_NAME, TextSpec, not_a_file
from leanclip.clip_tokenizer import clip_clean
from leanclip.errors import LeanclipError

FP32_MIN_COS = 0.999
INT8_MIN_COS = 0.99

DEFAULT_CHECK_TEXTS = (
    "a photo of a dog",
    "",
    "Two people riding bicycles along a beach at sunset, with surfboards & a red umbrella!",
    "café déjà vu 123 🐱",
    "x",
    " ".join(["a very long caption that goes on"] * 20),  # longer than the context: truncated
)


class ExportError(LeanclipError, RuntimeError):
    """Export failed, or the exported ONNX disagrees with its source (torch or fp32 ONNX)."""


def load_tokenizer(tokenizer_json: Any, text: TextSpec) -> Any:
    """A fresh ``tokenizers.Tokenizer`` from a path, a Tokenizer, or None (CLIP's BPE)."""
    from tokenizers import Tokenizer

    if tokenizer_json is None:
        if text.kind != "clip":
            raise ValueError(f"tokenizer_json is required for text kind {text.kind!r}")
        from leanclip.clip_tokenizer import build_clip_tokenizer

        return build_clip_tokenizer()
    if isinstance(tokenizer_json, Tokenizer):
        return Tokenizer.from_str(tokenizer_json.to_str())
    path = Path(tokenizer_json)
    problem = not_a_file(path)
    if problem == "missing":
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if problem:
        raise ValueError(f"tokenizer file {path} is {problem}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from None


def tokenize_batch(
    tok: Any, text: TextSpec, texts: Sequence[str], length: Optional[int]
) -> Dict[str, np.ndarray]:
    """ids / attention_mask padded with pad_id to ``length`` (None: the longest in the batch),
    cleaned and truncated as the Encoder does."""
    tok = copy.deepcopy(tok)
    tok.enable_truncation(text.context_length)
    tok.no_padding()
    if text.kind == "clip":
        texts = [clip_clean(t) for t in texts]
    encs = [e.ids for e in tok.encode_batch(list(texts))]
    n = length or max(len(e) for e in encs)
    ids = np.full((len(encs), n), text.pad_id, dtype=np.int64)
    mask = np.zeros((len(encs), n), dtype=np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    return {k: out[k] for k in text.inputs}


def check_images(size: int, mean: Sequence[float], std: Sequence[float]) -> List[np.ndarray]:
    """Deterministic normalized pixel batches of sizes 1 and 3: noise and smooth gradients."""
    rng = np.random.default_rng(0)
    noise = rng.random((2, size, size, 3), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    grad = np.stack([xx, yy, 1 - xx * yy], axis=-1)[None]
    imgs = np.concatenate([noise, grad], 0)
    imgs = (imgs - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    imgs = imgs.transpose(0, 3, 1, 2).copy()
    return [imgs[:1], imgs]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-30)


def session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@dataclass
class Check:
    what: str
    min_cos: float
    threshold: float
    details: List[str] = field(default_factory=list)

    def ok(self) -> bool:
        return self.min_cos >= self.threshold


def compare(what: str, threshold: float, pairs: Sequence[Tuple[str, np.ndarray, np.ndarray]]) -> Check:
    mins = []
    details = []
    for label, ref, got in pairs:
        if got.shape != ref.shape:
            raise ExportError(f"{what}: ONNX output shape {got.shape} != torch {ref.shape} ({label})")
        cos = cosines(ref, got)
        if not np.all(np.isfinite(got)):
            cos = np.full_like(cos, -1.0)
        mins.append(float(cos.min()))
        details.append(f"{label}: min cos {cos.min():.6f}")
    return Check(what, min(mins), threshold, details)


def raise_if_failed(checks: Sequence[Check], where: Path) -> None:
    bad = [c for c in checks if not c.ok()]
    if bad:
        lines = [
            f"{c.what}: min cosine {c.min_cos:.6f} < {c.threshold} ({'; '.join(c.details)})" for c in bad
        ]
        raise ExportError(f"ONNX self-check failed for {where}: " + " | ".join(lines))


def check_target(out: Path, overwrite: bool = True) -> None:
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"export target {out} exists and is not a directory")
        if any(out.iterdir()):
            if not (out / MANIFEST_NAME).is_file():
                raise FileExistsError(
                    f"export target {out} is a non-empty directory that is not a leanclip bundle"
                )
            if not overwrite:
                raise FileExistsError(f"export target {out} is an existing bundle (overwrite=False)")
