"""Export dual encoders to a leanclip model bundle (ONNX, fp32 or int8), checking the result.

* :func:`export_bundle` writes a bundle from a :class:`BundleTarget` (an image tower, a text
  tower, a tokenizer and what the manifest says about them);
* :func:`export_model` exports a whole dual encoder with CLIP's BPE (an open_clip ``CLIP``, a
  leanclip teacher or student): this is the open_clip converter behind
  ``leanclip models fetch openai-vit-b-32``;
* :mod:`leanclip.quantize` makes int8 copies of fp32 bundles (no torch needed).

The towers themselves live in :mod:`leanclip.towers`.

Needs the ``starter`` extra (torch, onnx, onnxscript; open_clip for CLIP models). Training
checkpoints are exported with ``python -m training.export`` from a checkout (docs/export.md).

Export runs the torch model and onnxruntime on the same inputs and refuses to write a bundle
whose embeddings disagree (cosine < 0.999 for fp32, < 0.99 for int8).

The exporter is torch.export (dynamo, opset 18) with dynamic batch and sequence axes; the
TorchScript exporter is a fallback. CLIP text towers are exported with a dynamic sequence axis:
the positional embedding and the causal mask are sliced to the input length L, so the Encoder
pads a batch only to its longest text. That is exact: the text transformer is causal and reads
its output at the end-of-text token, so positions after it cannot change the embedding (the
self-check verifies this against the model run on the full context).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from leanclip._fs import PathLike, staged_dir
from leanclip._selfcheck import (
    DEFAULT_CHECK_TEXTS,
    FP32_MIN_COS,
    INT8_MIN_COS,
    Check,
    ExportError,
    check_images,
    check_target,
    compare,
    load_tokenizer,
    raise_if_failed,
    session,
    tokenize_batch,
)
from leanclip.bundle import ImageSpec, Manifest, TextSpec, read_manifest, write_manifest
from leanclip.quantize import INT8_OP_TYPES, quantization_record, quantize_bundle, quantize_onnx
from leanclip.towers import towers_for

__all__ = [
    "BundleTarget",
    "ExportError",
    "export_bundle",
    "export_model",
    "quantize_bundle",
]

OPSET = 18  # torch.export's ONNX translator targets opset 18


# ---------------------------------------------------------------------------------------------
# ONNX export and checks


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


def _onnx_export(
    module: nn.Module,
    args: Tuple[torch.Tensor, ...],
    path: Path,
    input_names: List[str],
    output_name: Union[str, Sequence[str]],
    dynamic: Dict[str, Dict[int, str]],
) -> str:
    """Export with torch.export (dynamo); fall back to the TorchScript exporter if that fails.
    ``output_name``: one name, or a list of names for a module returning a tuple.

    The TorchScript exporter bakes the example sequence length into nn.MultiheadAttention's
    reshapes, so it is only a fallback; the self-check catches a length-specialized graph.
    Returns which exporter produced the file."""
    errors = []
    output_names = [output_name] if isinstance(output_name, str) else list(output_name)
    with _export_mode(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = tuple(
            {ax: torch.export.Dim.DYNAMIC for ax in dynamic.get(n, {})} or None for n in input_names
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # dynamo prints progress lines
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=True,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=shapes,
                    opset_version=OPSET,
                    external_data=False,
                    optimize=True,
                )
            return "torch.onnx (dynamo)"
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other one
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:500]}")
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
            )
            return "torch.onnx (TorchScript)"
        except Exception as exc:  # noqa: BLE001
            errors.append(f"TorchScript: {type(exc).__name__}: {str(exc)[:500]}")
    raise ExportError(f"ONNX export of {type(module).__name__} to {path.name} failed: " + " | ".join(errors))


def _torch_out(module: nn.Module, arrays: Sequence[np.ndarray]) -> np.ndarray:
    with _export_mode(module), torch.no_grad():
        return module(*[torch.from_numpy(a) for a in arrays]).float().numpy()


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass
class BundleTarget:
    """What a bundle is made of: the two towers, the tokenizer, and what the manifest says.

    ``image_tower(pixel_values) -> (n, d)``; ``text_tower(input_ids[, attention_mask]) -> (n, d)``
    with its inputs in ``text.inputs`` order. If the text tower has ``dynamic_length = False`` the
    sequence axis is fixed at ``text.context_length`` (the Encoder then pads to it).
    ``tokenizer_json``: a path, a ``tokenizers.Tokenizer``, or None for CLIP's BPE.
    ``text_reference`` (default ``text_tower``) is run at the full context length as the
    reference for the text check, which also proves that padding only to the batch's longest
    text is exact. ``embedding_dim``, when given, must be what the towers produce.
    ``example_texts``: the texts of the self-check (default: a fixed set). ``extra``: recorded in
    the manifest. ``image_int8_op_types`` / ``text_int8_op_types`` choose which ONNX op types an
    int8 export quantizes (some towers, e.g. MiniLM, lose too much with int8 MatMuls).
    """

    image_tower: nn.Module
    text_tower: nn.Module
    image: ImageSpec
    text: TextSpec
    tokenizer_json: Any = None
    name: str = "unnamed"
    source: str = ""
    embedding_dim: Optional[int] = None
    text_reference: Optional[nn.Module] = None
    example_texts: Optional[Sequence[str]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    image_int8_op_types: Sequence[str] = INT8_OP_TYPES
    text_int8_op_types: Sequence[str] = INT8_OP_TYPES


def _export_onnx(t: BundleTarget, tok: Any, folder: Path, dynamic_length: bool) -> Dict[str, str]:
    """Both towers to ONNX in ``folder``; returns file -> exporter that produced it."""
    image, text = t.image, t.text
    dummy_px = torch.from_numpy(check_images(int(image.size), image.mean, image.std)[1][:2])
    exporters = {}
    exporters[image.file] = _onnx_export(
        t.image_tower,
        (dummy_px,),
        folder / image.file,
        [image.input],
        image.output,
        {image.input: {0: "batch"}, image.output: {0: "batch"}},
    )
    seq_len = None if dynamic_length else text.context_length
    example = tokenize_batch(tok, text, ["a photo of a cat", "hi"], seq_len)
    text_axes: Dict[str, Dict[int, str]] = {text.output: {0: "batch"}}
    for n in text.inputs:
        text_axes[n] = {0: "batch", 1: "sequence"} if dynamic_length else {0: "batch"}
    exporters[text.file] = _onnx_export(
        t.text_tower,
        tuple(torch.from_numpy(example[n]) for n in text.inputs),
        folder / text.file,
        list(text.inputs),
        text.output,
        text_axes,
    )
    return exporters


class _SelfCheck:
    """The self-check's inputs and torch references (computed once), run against the ONNX files
    of a folder: images at batch 1 and more, texts padded as the Encoder pads them against the
    reference at the full context length."""

    def __init__(self, t: BundleTarget, tok: Any, dynamic_length: bool) -> None:
        image, text = t.image, t.text
        self.image, self.text = image, text
        seq_len = None if dynamic_length else text.context_length
        texts = list(t.example_texts) if t.example_texts else list(DEFAULT_CHECK_TEXTS)
        self.img_batches = check_images(int(image.size), image.mean, image.std)
        self.txt_batches = [
            tokenize_batch(tok, text, texts, seq_len),
            tokenize_batch(tok, text, texts[:1], seq_len),
        ]
        full = [tokenize_batch(tok, text, x, text.context_length) for x in (texts, texts[:1])]
        self.img_ref = [_torch_out(t.image_tower, [b]) for b in self.img_batches]
        ref_text_module = t.text_reference if t.text_reference is not None else t.text_tower
        self.txt_ref = [_torch_out(ref_text_module, [f[n] for n in text.inputs]) for f in full]
        self.dim = int(self.img_ref[0].shape[1])
        if self.txt_ref[0].shape[1] != self.dim:
            raise ExportError(
                f"image embeddings have dim {self.dim} but text embeddings {self.txt_ref[0].shape[1]}"
            )
        if t.embedding_dim is not None and int(t.embedding_dim) != self.dim:
            raise ExportError(
                f"embedding_dim={t.embedding_dim} but the towers produce {self.dim}-d embeddings"
            )

    def run(self, folder: Path, threshold: float, label: str) -> List[Check]:
        image, text = self.image, self.text
        si = session(folder / image.file)
        st = session(folder / text.file)
        img = compare(
            f"{label} image encoder",
            threshold,
            [
                (f"batch {len(b)}", r, si.run([image.output], {image.input: b})[0])
                for b, r in zip(self.img_batches, self.img_ref)
            ],
        )
        txt = compare(
            f"{label} text encoder",
            threshold,
            [
                (
                    f"batch {len(next(iter(b.values())))} length {next(iter(b.values())).shape[1]}",
                    r,
                    st.run([text.output], b)[0],
                )
                for b, r in zip(self.txt_batches, self.txt_ref)
            ],
        )
        return [img, txt]


def _fill_bundle(
    stage: Path, onnx_dir: Path, t: BundleTarget, tok: Any, dim: int, precision: str, info: Dict[str, Any]
) -> None:
    """Move the two ONNX files of ``onnx_dir`` into ``stage`` and write the tokenizer and the
    manifest next to them; then read it back as the Encoder will (fail here, not there)."""
    for f in (t.image.file, t.text.file):
        os.replace(onnx_dir / f, stage / f)
    tok.save(str(stage / t.text.tokenizer))
    if precision == "int8":
        info["quantization"] = quantization_record(
            t.image.file, t.image_int8_op_types, t.text.file, t.text_int8_op_types
        )
    manifest = Manifest(
        embedding_dim=dim,
        image=copy.deepcopy(t.image),
        text=copy.deepcopy(t.text),
        name=t.name,
        source=t.source,
        precision=precision,
        extra=info,
    )
    write_manifest(stage, manifest)
    read_manifest(stage, verify=True)


def export_bundle(
    out_dir: PathLike,
    target: BundleTarget,
    *,
    int8: bool = False,
    int8_out_dir: Optional[PathLike] = None,
    check: bool = True,
    overwrite: bool = True,
) -> Path:
    """Write the bundle of ``target`` to ``out_dir``; returns ``out_dir``.

    ``int8=True`` writes an int8 bundle (``precision: "int8"``) at ``out_dir``; the fp32 export it
    is quantized from is checked as well. ``int8_out_dir`` (with ``int8=False``) writes the fp32
    bundle to ``out_dir`` and, from the same export, an int8 bundle there. ``check=False`` skips
    the self-check (not recommended). An existing ``out_dir`` must be empty or a bundle (it is
    replaced); each bundle is built beside its target (``leanclip._fs.staged_dir``) and all are
    moved into place only once every one is complete, so a failed export leaves no half-written
    bundle.
    """
    t = target
    out = Path(out_dir)
    for dest in [out] + ([Path(int8_out_dir)] if int8_out_dir is not None else []):
        check_target(dest, overwrite)
    if t.text.kind not in ("clip", "wordpiece"):
        raise ValueError(f"unknown text kind {t.text.kind!r} (expected 'clip' or 'wordpiece')")
    unknown = [n for n in t.text.inputs if n not in ("input_ids", "attention_mask")]
    if unknown or not t.text.inputs or t.text.inputs[0] != "input_ids":
        raise ValueError(
            f"text.inputs must be ['input_ids'] or ['input_ids', 'attention_mask'], got {t.text.inputs}"
        )
    tok = load_tokenizer(t.tokenizer_json, t.text)
    dynamic_length = bool(getattr(t.text_tower, "dynamic_length", True))

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.export-", dir=out.parent) as tmp:
        fp32 = Path(tmp) / "fp32"
        fp32.mkdir()
        exporters = _export_onnx(t, tok, fp32, dynamic_length)
        self_check = _SelfCheck(t, tok, dynamic_length)
        checks: List[Check] = []
        if check:
            checks += self_check.run(fp32, FP32_MIN_COS, "fp32")
            raise_if_failed(checks, out)
        # (target, folder holding its ONNX files, precision, checks)
        outputs: List[Tuple[Path, Path, str, List[Check]]] = []
        int8_target = out if int8 else (Path(int8_out_dir) if int8_out_dir is not None else None)
        if int8_target is not None:
            q = Path(tmp) / "int8"
            q.mkdir()
            quantize_onnx(fp32 / t.image.file, q / t.image.file, op_types=t.image_int8_op_types)
            quantize_onnx(fp32 / t.text.file, q / t.text.file, op_types=t.text_int8_op_types)
            int8_checks: List[Check] = []
            if check:
                int8_checks = self_check.run(q, INT8_MIN_COS, "int8")
                raise_if_failed(int8_checks, int8_target)
            outputs.append((int8_target, q, "int8", checks + int8_checks))
        if not int8:
            outputs.append((out, fp32, "fp32", checks))

        # every bundle is staged beside its target; all move into place when the stack closes
        with contextlib.ExitStack() as stack:
            for dest, onnx_dir, precision, dest_checks in outputs:
                info: Dict[str, Any] = dict(t.extra)
                info["exporter"] = {
                    f: f"torch {torch.__version__} {e}, opset {OPSET}" for f, e in exporters.items()
                }
                info["text_dynamic_length"] = dynamic_length
                info["self_check"] = (
                    {c.what: round(c.min_cos, 6) for c in dest_checks} if check else "skipped"
                )
                stage = stack.enter_context(staged_dir(dest))
                _fill_bundle(stage, onnx_dir, t, tok, self_check.dim, precision, info)
    return out


def image_spec_for(model: nn.Module) -> ImageSpec:
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
        raise ExportError(
            f"resize_mode {cfg.get('resize_mode')!r} is not supported (bundles resize the shortest side)"
        )
    return spec


def _has_own_tokenizer(model: nn.Module) -> bool:
    """True when ``model``'s text tower does not read CLIP BPE ids: it says so with
    ``own_tokenizer = True`` (on the model or its ``text`` tower) or carries its own tokenizer."""
    unwrapped = getattr(model, "module", model)
    text = getattr(unwrapped, "text", None)
    return (
        any(bool(getattr(m, "own_tokenizer", False)) for m in (unwrapped, text))
        or getattr(text, "tokenizer", None) is not None
    )


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
    towers = towers_for(model)
    if _has_own_tokenizer(model):  # e.g. the TinyBERT baseline: CLIP's BPE would be wrong
        raise ValueError(
            "export of a student with a Hugging Face text tower (its own WordPiece "
            "tokenizer) is not supported"
        )
    context = int(getattr(model, "context_length", 77) or 77)
    target = BundleTarget(
        image_tower=towers.image,
        text_tower=towers.text,
        tokenizer_json=tokenizer_json,
        image=image_spec_for(model),
        text=TextSpec(context_length=context, kind="clip", inputs=["input_ids"], pad_id=0),
        name=name,
        source=source,
        example_texts=example_texts,
        text_reference=towers.text_reference,
        extra=dict(extra or {}),
    )
    return export_bundle(out_dir, target, int8=int8, check=check, int8_out_dir=int8_out_dir)
