"""Export dual encoders to a leanclip model bundle (ONNX, fp32 or int8), checking the result.

    python -m training.export CHECKPOINT_OR_NAME OUT_DIR [--int8] [--pretrained TAG_OR_FILE]

``CHECKPOINT_OR_NAME`` is a leanclip training checkpoint (teacher or student, rebuilt by
``training.models.load_model``), an open_clip checkpoint file (``--arch`` names its
architecture, default ViT-B-32), or an open_clip model name (``--pretrained`` picks its weights:
a local file or a tag; without it the weights are random, which the manifest records).
``--int8`` also writes an int8 bundle beside OUT_DIR, at ``OUT_DIR-int8`` (a bundle has one
precision, recorded in its ``leanclip.json``).

Export runs the torch model and onnxruntime on the same inputs and refuses to write a bundle
whose embeddings disagree (cosine < 0.999 for fp32, < 0.99 for int8).

The exporter is torch.export (dynamo, opset 18) with dynamic batch and sequence axes; the
TorchScript exporter is a fallback. CLIP text towers are exported with a dynamic sequence axis: the positional embedding and the
causal mask are sliced to the input length L, so the Encoder pads a batch only to its longest
text. That is exact: the text transformer is causal and reads its output at the end-of-text
token, so positions after it cannot change the embedding (the self-check verifies this against
the model run on the full context).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

try:
    import leanclip.bundle  # noqa: F401
except ImportError:  # run from a checkout without an installed leanclip: use python/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from leanclip.bundle import (  # noqa: E402
    MANIFEST_NAME,
    BundleError,
    ImageSpec,
    Manifest,
    TextSpec,
    read_manifest,
    write_manifest,
)

PathLike = Union[str, "os.PathLike[str]"]

OPSET = 18  # torch.export's ONNX translator targets opset 18
FP32_MIN_COS = 0.999
INT8_MIN_COS = 0.99
# Dynamic quantization of MatMul/Gemm (transformer and projection weights) and Gather (token
# embeddings, which dominate a small text tower's size). Conv is left in fp32: onnxruntime's
# ConvInteger has no fast x86 kernel and the ViT patch conv is a small share of the time.
INT8_OP_TYPES = ("MatMul", "Gemm", "Gather")

DEFAULT_CHECK_TEXTS = (
    "a photo of a dog",
    "",
    "Two people riding bicycles along a beach at sunset, with surfboards & a red umbrella!",
    "café déjà vu 123 🐱",
    "x",
    " ".join(["a very long caption that goes on"] * 20),  # longer than the context: truncated
)


class ExportError(RuntimeError):
    """Export failed, or the exported ONNX disagrees with the torch model."""


# ---------------------------------------------------------------------------------------------
# Towers: torch modules with exactly the ONNX signatures of the bundle


class ImageTower(nn.Module):
    """pixels (n, 3, S, S) -> embeddings, through ``model.encode_image``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class CLIPTextTower(nn.Module):
    """CLIP's causal text encoder for any length L <= context length.

    Built from any module with open_clip's text attributes (``token_embedding``,
    ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``, ``attn_mask``):
    open_clip's ``CLIP``, its ``TextTransformer``, or a leanclip student text tower."""

    dynamic_length = True

    def __init__(self, src: Any) -> None:
        super().__init__()
        self.token_embedding: Any = src.token_embedding
        self.positional_embedding: Any = src.positional_embedding
        self.transformer: Any = src.transformer
        self.ln_final: Any = src.ln_final
        self.text_projection: Any = src.text_projection
        mask = getattr(src, "attn_mask", None)
        self.attn_mask: Any
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)
        self.pool_type = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        self.eos_id = getattr(src, "text_eos_id", getattr(src, "eos_id", None))

    @staticmethod
    def supports(src: nn.Module) -> bool:
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if not all(hasattr(src, a) for a in needed) or getattr(src, "cls_emb", None) is not None:
            return False
        pool = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        # "last" pooling reads the last position, which padding moves: not length-invariant
        return pool in ("argmax", "eos", "first")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "argmax":
            x = x[rows, input_ids.argmax(dim=-1)]
        elif self.pool_type == "eos":
            x = x[rows, torch.eq(input_ids, self.eos_id).to(torch.int32).argmax(dim=-1)]
        else:
            x = x[:, 0]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


class FixedLengthTextTower(nn.Module):
    """Any ``encode_text`` at the full context length (the Encoder pads to it)."""

    dynamic_length = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def text_tower_for(model: nn.Module) -> nn.Module:
    """The best ONNX-exportable text tower of a dual encoder (dynamic length when possible)."""
    for src in (model, getattr(model, "text", None)):
        if isinstance(src, nn.Module) and CLIPTextTower.supports(src):
            return CLIPTextTower(src)
    return FixedLengthTextTower(model)


# ---------------------------------------------------------------------------------------------
# Tokenization for the self-check (the same steps as leanclip.Encoder)


def _load_tokenizer(tokenizer_json: Any, text: TextSpec) -> Any:
    from tokenizers import Tokenizer

    if tokenizer_json is None:
        if text.kind != "clip":
            raise ValueError(f"tokenizer_json is required for text kind {text.kind!r}")
        from training.tokenizer import build_clip_tokenizer

        return build_clip_tokenizer()
    if isinstance(tokenizer_json, Tokenizer):
        return Tokenizer.from_str(tokenizer_json.to_str())
    path = Path(tokenizer_json)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from None


def _tokenize(tok: Any, text: TextSpec, texts: Sequence[str], length: Optional[int]) -> Dict[str, np.ndarray]:
    """ids / attention_mask padded with pad_id to ``length`` (None: the longest in the batch)."""
    from training.tokenizer import clip_clean

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


def _check_images(size: int, mean: Sequence[float], std: Sequence[float]) -> List[np.ndarray]:
    """Deterministic normalized pixel batches of sizes 1 and 3: noise and smooth gradients."""
    rng = np.random.default_rng(0)
    noise = rng.random((2, size, size, 3), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    grad = np.stack([xx, yy, 1 - xx * yy], axis=-1)[None]
    imgs = np.concatenate([noise, grad], 0)
    imgs = (imgs - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    imgs = imgs.transpose(0, 3, 1, 2).copy()
    return [imgs[:1], imgs]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-30)


# ---------------------------------------------------------------------------------------------
# ONNX export, quantization and checks


@contextlib.contextmanager
def _export_mode(module: nn.Module) -> Iterator[None]:
    """eval mode, and MultiheadAttention's fused fast path off (it has no ONNX translation)."""
    was_training = module.training
    fast = torch.backends.mha.get_fastpath_enabled()
    module.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        module.train(was_training)


def _onnx_export(module: nn.Module, args: Tuple[torch.Tensor, ...], path: Path, input_names: List[str],
                 output_name: str, dynamic: Dict[str, Dict[int, str]]) -> str:
    """Export with torch.export (dynamo); fall back to the TorchScript exporter if that fails.

    The TorchScript exporter bakes the example sequence length into nn.MultiheadAttention's
    reshapes, so it is only a fallback; the self-check catches a length-specialized graph.
    Returns which exporter produced the file."""
    errors = []
    with _export_mode(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = tuple({ax: torch.export.Dim.DYNAMIC for ax in dynamic.get(n, {})} or None for n in input_names)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # dynamo prints progress lines
                torch.onnx.export(
                    module, args, str(path), dynamo=True, input_names=input_names,
                    output_names=[output_name], dynamic_shapes=shapes, opset_version=OPSET,
                    external_data=False, optimize=True,
                )
            return "torch.onnx (dynamo)"
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other one
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:500]}")
        try:
            torch.onnx.export(
                module, args, str(path), dynamo=False, input_names=input_names,
                output_names=[output_name], dynamic_axes=dynamic, opset_version=OPSET,
                do_constant_folding=True,
            )
            return "torch.onnx (TorchScript)"
        except Exception as exc:  # noqa: BLE001
            errors.append(f"TorchScript: {type(exc).__name__}: {str(exc)[:500]}")
    raise ExportError(f"ONNX export of {type(module).__name__} to {path.name} failed: " + " | ".join(errors))


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


INT8_PER_CHANNEL = True


def quantize_onnx(src: Path, dst: Path, op_types: Sequence[str] = INT8_OP_TYPES,
                  per_channel: bool = INT8_PER_CHANNEL) -> None:
    """onnxruntime dynamic int8 quantization (int8 weights, uint8 activations computed per call).

    Per-channel weight scales by default: on random-weight ViT-S/32 they raised the image
    embeddings' cosine to fp32 from 0.995 to 0.9994 (top-10 retrieval agreement 0.83 -> 0.93)
    for ~5% of int8 speed (benchmarks/results/encoders.md). Signed int8 weights: unsigned ones
    ran 1.5x instead of 2.5x faster than fp32 on this AVX2 CPU."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
                per_channel=per_channel, reduce_range=False,
            )
    finally:
        root.setLevel(level)


@dataclass
class _Check:
    what: str
    min_cos: float
    threshold: float
    details: List[str] = field(default_factory=list)

    def ok(self) -> bool:
        return self.min_cos >= self.threshold


def _torch_out(module: nn.Module, arrays: Sequence[np.ndarray]) -> np.ndarray:
    with _export_mode(module), torch.no_grad():
        return module(*[torch.from_numpy(a) for a in arrays]).float().numpy()


def _compare(what: str, threshold: float, pairs: Sequence[Tuple[str, np.ndarray, np.ndarray]]) -> _Check:
    mins = []
    details = []
    for label, ref, got in pairs:
        if got.shape != ref.shape:
            raise ExportError(f"{what}: ONNX output shape {got.shape} != torch {ref.shape} ({label})")
        cos = _cosines(ref, got)
        if not np.all(np.isfinite(got)):
            cos = np.full_like(cos, -1.0)
        mins.append(float(cos.min()))
        details.append(f"{label}: min cos {cos.min():.6f}")
    return _Check(what, min(mins), threshold, details)


def _raise_if_failed(checks: Sequence[_Check], where: Path) -> None:
    bad = [c for c in checks if not c.ok()]
    if bad:
        lines = [f"{c.what}: min cosine {c.min_cos:.6f} < {c.threshold} ({'; '.join(c.details)})" for c in bad]
        raise ExportError(f"ONNX self-check failed for {where}: " + " | ".join(lines))


# ---------------------------------------------------------------------------------------------
# Public API


def _check_target(out: Path, overwrite: bool = True) -> None:
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"export target {out} exists and is not a directory")
        if any(out.iterdir()):
            if not (out / MANIFEST_NAME).is_file():
                raise FileExistsError(f"export target {out} is a non-empty directory that is not a leanclip bundle")
            if not overwrite:
                raise FileExistsError(f"export target {out} is an existing bundle (overwrite=False)")


def export_bundle(
    out_dir: PathLike,
    *,
    image_tower: nn.Module,
    text_tower: nn.Module,
    tokenizer_json: Any = None,
    image: ImageSpec,
    text: TextSpec,
    embedding_dim: Optional[int] = None,
    name: str = "unnamed",
    source: str = "",
    int8: bool = False,
    check: bool = True,
    example_texts: Optional[Sequence[str]] = None,
    text_reference: Optional[nn.Module] = None,
    extra: Optional[Dict[str, Any]] = None,
    overwrite: bool = True,
    int8_out_dir: Optional[PathLike] = None,
    image_int8_op_types: Sequence[str] = INT8_OP_TYPES,
    text_int8_op_types: Sequence[str] = INT8_OP_TYPES,
) -> Path:
    """Write a bundle to ``out_dir`` from two torch towers and a tokenizer; returns ``out_dir``.

    ``image_tower(pixel_values) -> (n, d)``; ``text_tower(input_ids[, attention_mask]) -> (n, d)``
    with its inputs in ``text.inputs`` order. If the tower has ``dynamic_length = False`` the
    sequence axis is fixed at ``text.context_length`` (the Encoder then pads to it).
    ``tokenizer_json``: a path, a ``tokenizers.Tokenizer``, or None for CLIP's BPE.
    ``int8=True`` writes an int8 bundle (``precision: "int8"``) at ``out_dir``; the fp32 export it
    is quantized from is checked as well. ``int8_out_dir`` (with ``int8=False``) writes the fp32
    bundle to ``out_dir`` and, from the same export, an int8 bundle there. ``image_int8_op_types``
    / ``text_int8_op_types`` choose which ONNX op types are quantized (some towers, e.g. MiniLM,
    lose too much with int8 MatMuls). ``text_reference`` (default ``text_tower``) is run at the full
    context length as the reference for the text check, which also proves that padding only to
    the batch's longest text is exact. ``check=False`` skips the self-check (not recommended).
    An existing ``out_dir`` must be empty or a bundle (it is replaced); the new bundle is built
    beside it and moved into place, so a failed export leaves no half-written bundle.
    """
    out = Path(out_dir)
    for target in [out] + ([Path(int8_out_dir)] if int8_out_dir is not None else []):
        _check_target(target, overwrite)
    if text.kind not in ("clip", "wordpiece"):
        raise ValueError(f"unknown text kind {text.kind!r} (expected 'clip' or 'wordpiece')")
    unknown = [n for n in text.inputs if n not in ("input_ids", "attention_mask")]
    if unknown or not text.inputs or text.inputs[0] != "input_ids":
        raise ValueError(f"text.inputs must be ['input_ids'] or ['input_ids', 'attention_mask'], got {text.inputs}")
    tok = _load_tokenizer(tokenizer_json, text)
    dynamic_length = bool(getattr(text_tower, "dynamic_length", True))

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        fp32 = work / "fp32"
        fp32.mkdir()
        # --- export fp32
        size = int(image.size)
        dummy_px = torch.from_numpy(_check_images(size, image.mean, image.std)[1][:2])
        exporters = {}
        exporters[image.file] = _onnx_export(image_tower, (dummy_px,), fp32 / image.file, [image.input], image.output,
                     {image.input: {0: "batch"}, image.output: {0: "batch"}})
        example = _tokenize(tok, text, ["a photo of a cat", "hi"], None if dynamic_length else text.context_length)
        text_axes: Dict[str, Dict[int, str]] = {text.output: {0: "batch"}}
        for n in text.inputs:
            text_axes[n] = {0: "batch", 1: "sequence"} if dynamic_length else {0: "batch"}
        exporters[text.file] = _onnx_export(text_tower, tuple(torch.from_numpy(example[n]) for n in text.inputs), fp32 / text.file,
                     list(text.inputs), text.output, text_axes)

        # --- self-check inputs and torch references
        texts = list(example_texts) if example_texts else list(DEFAULT_CHECK_TEXTS)
        img_batches = _check_images(size, image.mean, image.std)
        txt_batches = [_tokenize(tok, text, texts, None if dynamic_length else text.context_length),
                       _tokenize(tok, text, texts[:1], None if dynamic_length else text.context_length)]
        full = [_tokenize(tok, text, t, text.context_length) for t in (texts, texts[:1])]
        img_ref = [_torch_out(image_tower, [b]) for b in img_batches]
        ref_text_module = text_reference if text_reference is not None else text_tower
        txt_ref = [_torch_out(ref_text_module, [f[n] for n in text.inputs]) for f in full]
        dim = int(img_ref[0].shape[1])
        if txt_ref[0].shape[1] != dim:
            raise ExportError(f"image embeddings have dim {dim} but text embeddings {txt_ref[0].shape[1]}")
        if embedding_dim is not None and int(embedding_dim) != dim:
            raise ExportError(f"embedding_dim={embedding_dim} but the towers produce {dim}-d embeddings")

        def run_checks(folder: Path, threshold: float, label: str) -> List[_Check]:
            si = _session(folder / image.file)
            st = _session(folder / text.file)
            img = _compare(f"{label} image encoder", threshold, [
                (f"batch {len(b)}", r, si.run([image.output], {image.input: b})[0]) for b, r in zip(img_batches, img_ref)])
            txt = _compare(f"{label} text encoder", threshold, [
                (f"batch {len(next(iter(b.values())))} length {next(iter(b.values())).shape[1]}", r,
                 st.run([text.output], b)[0]) for b, r in zip(txt_batches, txt_ref)])
            return [img, txt]

        checks: List[_Check] = []
        if check:
            checks += run_checks(fp32, FP32_MIN_COS, "fp32")
            _raise_if_failed(checks, out)
        # (target, folder holding its ONNX files, precision, checks)
        outputs: List[Tuple[Path, Path, str, List[_Check]]] = []
        int8_target = out if int8 else (Path(int8_out_dir) if int8_out_dir is not None else None)
        if int8_target is not None:
            q = work / "int8"
            q.mkdir()
            quantize_onnx(fp32 / image.file, q / image.file, op_types=image_int8_op_types)
            quantize_onnx(fp32 / text.file, q / text.file, op_types=text_int8_op_types)
            int8_checks: List[_Check] = []
            if check:
                int8_checks = run_checks(q, INT8_MIN_COS, "int8")
                _raise_if_failed(int8_checks, int8_target)
            outputs.append((int8_target, q, "int8", checks + int8_checks))
        if not int8:
            outputs.append((out, fp32, "fp32", checks))

        staged: List[Tuple[Path, Path]] = []
        for i, (target, folder, precision, target_checks) in enumerate(outputs):
            stage = work / f"bundle{i}"
            stage.mkdir()
            for f in (image.file, text.file):
                os.replace(folder / f, stage / f)
            tok.save(str(stage / text.tokenizer))
            info: Dict[str, Any] = dict(extra or {})
            info.update({
                "exporter": {f: f"torch {torch.__version__} {e}, opset {OPSET}" for f, e in exporters.items()},
                "text_dynamic_length": dynamic_length,
                "self_check": {c.what: round(c.min_cos, 6) for c in target_checks} if check else "skipped",
            })
            if precision == "int8":
                info["quantization"] = {"method": "onnxruntime quantize_dynamic", "weight_type": "QInt8",
                                        "op_types": {image.file: list(image_int8_op_types),
                                                     text.file: list(text_int8_op_types)},
                                        "per_channel": INT8_PER_CHANNEL}
            manifest = Manifest(embedding_dim=dim, image=copy.deepcopy(image), text=copy.deepcopy(text),
                                name=name, source=source, precision=precision, extra=info)
            write_manifest(stage, manifest)
            read_manifest(stage, verify=True)  # what the Encoder will do: fail here, not there
            staged.append((stage, target))

        # --- move into place
        for i, (stage, target) in enumerate(staged):
            if target.exists():
                os.replace(target, work / f"old{i}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def quantize_bundle(src_dir: PathLike, out_dir: PathLike, *, check: bool = True,
                    image_op_types: Sequence[str] = INT8_OP_TYPES,
                    text_op_types: Sequence[str] = INT8_OP_TYPES) -> Path:
    """An int8 copy of an fp32 bundle (no torch needed), checked against the fp32 ONNX models."""
    src = Path(src_dir)
    m = read_manifest(src, verify=True)
    if m.precision != "fp32":
        raise BundleError(f"{src} is a {m.precision} bundle; quantize an fp32 bundle")
    out = Path(out_dir)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.quant-", dir=out.parent))
    try:
        stage = work / "bundle"
        stage.mkdir()
        quantize_onnx(src / m.image.file, stage / m.image.file, op_types=image_op_types)
        quantize_onnx(src / m.text.file, stage / m.text.file, op_types=text_op_types)
        for f in m.files:
            if f not in (m.image.file, m.text.file):
                shutil.copy2(src / f, stage / f)
        checks: List[_Check] = []
        if check:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(src / m.text.tokenizer))
            imgs = _check_images(m.image.size, m.image.mean, m.image.std)
            txts = [_tokenize(tok, m.text, list(DEFAULT_CHECK_TEXTS), None)]
            for label, f, feeds, outname in (
                ("int8 image encoder", m.image.file, [{m.image.input: b} for b in imgs], m.image.output),
                ("int8 text encoder", m.text.file, txts, m.text.output),
            ):
                ref_s, got_s = _session(src / f), _session(stage / f)
                checks.append(_compare(label, INT8_MIN_COS, [
                    (f"batch {i}", ref_s.run([outname], fd)[0], got_s.run([outname], fd)[0]) for i, fd in enumerate(feeds)]))
            _raise_if_failed(checks, out)
        extra = dict(m.extra)
        extra["quantization"] = {"method": "onnxruntime quantize_dynamic", "weight_type": "QInt8",
                                 "op_types": {m.image.file: list(image_op_types), m.text.file: list(text_op_types)},
                                 "per_channel": INT8_PER_CHANNEL, "from": m.model_id}
        if check:
            extra["self_check_int8_vs_fp32"] = {c.what: round(c.min_cos, 6) for c in checks}
        manifest = Manifest(embedding_dim=m.embedding_dim, image=m.image, text=m.text, name=m.name,
                            source=m.source, precision="int8", extra=extra,
                            files={k: "" for k in m.files})
        write_manifest(stage, manifest)
        if out.exists():
            os.replace(out, work / "old")
        os.replace(stage, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _image_spec_for(model: nn.Module) -> ImageSpec:
    size = getattr(model, "image_size", None)
    visual = getattr(model, "visual", None)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    if size is None:
        size = getattr(visual, "image_size", None) or cfg.get("size")
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ExportError(f"non-square image size {size} is not supported by the bundle format")
        size = size[0]
    if size is None:
        raise ExportError("cannot tell the model's image size: set model.image_size")
    mean = getattr(model, "image_mean", None) or cfg.get("mean")
    std = getattr(model, "image_std", None) or cfg.get("std")
    spec = ImageSpec(size=int(size))
    if mean is not None:
        spec.mean = [float(v) for v in mean]
    if std is not None:
        spec.std = [float(v) for v in std]
    interp = cfg.get("interpolation")
    if interp:
        spec.interpolation = str(interp)
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ExportError(f"resize_mode {cfg.get('resize_mode')!r} is not supported (bundles resize the shortest side)")
    return spec


def export_model(
    model: nn.Module,
    out_dir: PathLike,
    *,
    name: str = "unnamed",
    source: str = "",
    int8: bool = False,
    check: bool = True,
    tokenizer_json: Any = None,
    example_texts: Optional[Sequence[str]] = None,
    extra: Optional[Dict[str, Any]] = None,
    int8_out_dir: Optional[PathLike] = None,
) -> Path:
    """Export a whole dual encoder (open_clip CLIP, a leanclip teacher or student) with CLIP's BPE."""
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise TypeError(f"{type(model).__name__} has no encode_image / encode_text: not a dual encoder")
    from training.models import has_own_tokenizer

    if has_own_tokenizer(model):  # e.g. the TinyBERT baseline: CLIP's BPE would be wrong
        raise ValueError("export of a student with a Hugging Face text tower (its own WordPiece "
                         "tokenizer) is not supported")
    context = int(getattr(model, "context_length", 77) or 77)
    text_tower = text_tower_for(model)
    return export_bundle(
        out_dir,
        image_tower=ImageTower(model),
        text_tower=text_tower,
        tokenizer_json=tokenizer_json,
        image=_image_spec_for(model),
        text=TextSpec(context_length=context, kind="clip", inputs=["input_ids"], pad_id=0),
        name=name,
        source=source,
        int8=int8,
        check=check,
        example_texts=example_texts,
        text_reference=FixedLengthTextTower(model),
        extra=extra,
        int8_out_dir=int8_out_dir,
    )


def load_source(spec: str, *, pretrained: Optional[str] = None, arch: str = "ViT-B-32") -> Tuple[nn.Module, str, str]:
    """(model, name, source description) for a checkpoint path or an open_clip model name."""
    path = Path(spec)
    if path.is_file():
        from training import models

        try:
            model = models.load_model(path)
            kind = getattr(model, "leanclip_config", {}).get("kind", "model")
            return model, path.stem, f"leanclip {kind} checkpoint {path.name}"
        except models.CheckpointError:
            pass  # not a leanclip checkpoint: an open_clip one
        model = models.build_teacher(arch, pretrained=str(path))
        return model.eval(), f"{arch}-{path.stem}", f"open_clip {arch} checkpoint {path.name}"
    if os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"checkpoint not found: {spec}")
    import open_clip

    if spec not in open_clip.list_models():
        raise ValueError(f"{spec!r} is neither a checkpoint file nor an open_clip model name")
    from training import models

    model = models.build_teacher(spec, pretrained=pretrained)
    weights = f"weights {pretrained}" if pretrained else "RANDOM weights (no --pretrained given)"
    return model.eval(), spec, f"open_clip {spec}, {weights}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="leanclip/open_clip checkpoint file, or an open_clip model name")
    parser.add_argument("out_dir", help="bundle directory to write")
    parser.add_argument("--int8", action="store_true", help="also write an int8 bundle at OUT_DIR-int8")
    parser.add_argument("--pretrained", default=None, help="open_clip weights (tag or file) for a model name")
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture of an open_clip checkpoint file")
    parser.add_argument("--name", default=None, help="bundle name (default: from the source)")
    parser.add_argument("--no-check", action="store_true", help="skip the torch-vs-ONNX self-check")
    args = parser.parse_args(argv)
    try:
        model, name, source = load_source(args.source, pretrained=args.pretrained, arch=args.arch)
        out8 = Path(str(Path(args.out_dir)) + "-int8") if args.int8 else None
        out = export_model(model, args.out_dir, name=args.name or name, source=source, check=not args.no_check,
                           int8_out_dir=out8)
        for d in [out] + ([out8] if out8 else []):
            m = read_manifest(d)
            print(f"wrote {d} ({m.precision}, dim {m.embedding_dim}; self-check {json.dumps(m.extra.get('self_check'))})")
    except (ExportError, BundleError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
