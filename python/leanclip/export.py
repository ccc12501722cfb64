"""Export dual encoders to a leanclip model bundle (ONNX, fp32 or int8), checking the result.

* :func:`export_bundle` writes a bundle from an image tower, a text tower and a tokenizer;
* :func:`export_model` exports a whole dual encoder with CLIP's BPE (an open_clip ``CLIP``, a
  leanclip teacher or student): this is the open_clip converter behind
  ``leanclip models fetch openai-vit-b-32``;
* :mod:`leanclip.quantize` makes int8 copies of fp32 bundles (no torch needed).

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
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from leanclip._fs import PathLike
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

__all__ = [
    "CLIPTextTower",
    "ExportError",
    "FixedLengthTextTower",
    "ImageTower",
    "export_bundle",
    "export_model",
    "quantize_bundle",
    "text_tower_for",
]

OPSET = 18  # torch.export's ONNX translator targets opset 18


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
    """CLIP's causal text encoder for any sequence length L <= context length: the one home of
    this tower, for export and for training's students.

    ``CLIPTextTower(vocab_size=..., context_length=..., width=..., heads=..., layers=...,
    output_dim=...)`` builds a fresh one (random weights; training's truncated-teacher student).
    :meth:`wrap` shares the modules of an existing text encoder with open_clip's attributes
    (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``,
    ``text_projection``, ``attn_mask``): open_clip's ``CLIP`` or ``TextTransformer``, or
    another ``CLIPTextTower``. The positional embedding and causal mask are sliced to L, so the
    ONNX export has a dynamic sequence axis; pooling is at the end-of-text token (``argmax``:
    the largest id in CLIP's vocabulary), a given ``eos`` id, or the first token."""

    dynamic_length = True
    POOLING = ("argmax", "eos", "first")

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        heads: int,
        layers: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, Transformer

        self.context_length = context_length
        self.token_embedding: Any = nn.Embedding(vocab_size, width)
        self.positional_embedding: Any = nn.Parameter(torch.empty(context_length, width))
        self.transformer: Any = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            act_layer=QuickGELU if quick_gelu else nn.GELU,
            norm_layer=LayerNorm,
        )
        self.ln_final: Any = LayerNorm(width)
        self.text_projection: Any = nn.Parameter(torch.empty(width, output_dim))
        self.attn_mask: Any
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.pool_type = "argmax"
        self.eos_id: Optional[int] = None
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @classmethod
    def wrap(cls, src: Any) -> "CLIPTextTower":
        """A tower sharing ``src``'s text modules (no copy), see :meth:`supports`."""
        if not cls.supports(src):
            raise TypeError(f"{type(src).__name__} is not a CLIP-style causal text encoder")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.context_length = int(src.positional_embedding.shape[0])
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        mask = getattr(src, "attn_mask", None)
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)
        self.pool_type = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        self.eos_id = getattr(src, "text_eos_id", getattr(src, "eos_id", None))
        return self

    @classmethod
    def supports(cls, src: Any) -> bool:
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if not all(hasattr(src, a) for a in needed) or getattr(src, "cls_emb", None) is not None:
            return False
        pool = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        # "last" pooling reads the last position, which padding moves: not length-invariant
        return pool in cls.POOLING

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token sequence length {length} exceeds the context length {self.context_length}"
            )
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "argmax":
            x = x[rows, input_ids.argmax(dim=-1)]
        elif self.pool_type == "eos":
            x = x[rows, torch.eq(input_ids, int(self.eos_id or 0)).to(torch.int32).argmax(dim=-1)]
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
            return CLIPTextTower.wrap(src)
    return FixedLengthTextTower(model)


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
        check_target(target, overwrite)
    if text.kind not in ("clip", "wordpiece"):
        raise ValueError(f"unknown text kind {text.kind!r} (expected 'clip' or 'wordpiece')")
    unknown = [n for n in text.inputs if n not in ("input_ids", "attention_mask")]
    if unknown or not text.inputs or text.inputs[0] != "input_ids":
        raise ValueError(
            f"text.inputs must be ['input_ids'] or ['input_ids', 'attention_mask'], got {text.inputs}"
        )
    tok = load_tokenizer(tokenizer_json, text)
    dynamic_length = bool(getattr(text_tower, "dynamic_length", True))

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        fp32 = work / "fp32"
        fp32.mkdir()
        # --- export fp32
        size = int(image.size)
        dummy_px = torch.from_numpy(check_images(size, image.mean, image.std)[1][:2])
        exporters = {}
        exporters[image.file] = _onnx_export(
            image_tower,
            (dummy_px,),
            fp32 / image.file,
            [image.input],
            image.output,
            {image.input: {0: "batch"}, image.output: {0: "batch"}},
        )
        example = tokenize_batch(
            tok, text, ["a photo of a cat", "hi"], None if dynamic_length else text.context_length
        )
        text_axes: Dict[str, Dict[int, str]] = {text.output: {0: "batch"}}
        for n in text.inputs:
            text_axes[n] = {0: "batch", 1: "sequence"} if dynamic_length else {0: "batch"}
        exporters[text.file] = _onnx_export(
            text_tower,
            tuple(torch.from_numpy(example[n]) for n in text.inputs),
            fp32 / text.file,
            list(text.inputs),
            text.output,
            text_axes,
        )

        # --- self-check inputs and torch references
        texts = list(example_texts) if example_texts else list(DEFAULT_CHECK_TEXTS)
        img_batches = check_images(size, image.mean, image.std)
        txt_batches = [
            tokenize_batch(tok, text, texts, None if dynamic_length else text.context_length),
            tokenize_batch(tok, text, texts[:1], None if dynamic_length else text.context_length),
        ]
        full = [tokenize_batch(tok, text, t, text.context_length) for t in (texts, texts[:1])]
        img_ref = [_torch_out(image_tower, [b]) for b in img_batches]
        ref_text_module = text_reference if text_reference is not None else text_tower
        txt_ref = [_torch_out(ref_text_module, [f[n] for n in text.inputs]) for f in full]
        dim = int(img_ref[0].shape[1])
        if txt_ref[0].shape[1] != dim:
            raise ExportError(f"image embeddings have dim {dim} but text embeddings {txt_ref[0].shape[1]}")
        if embedding_dim is not None and int(embedding_dim) != dim:
            raise ExportError(f"embedding_dim={embedding_dim} but the towers produce {dim}-d embeddings")

        def run_checks(folder: Path, threshold: float, label: str) -> List[Check]:
            si = session(folder / image.file)
            st = session(folder / text.file)
            img = compare(
                f"{label} image encoder",
                threshold,
                [
                    (f"batch {len(b)}", r, si.run([image.output], {image.input: b})[0])
                    for b, r in zip(img_batches, img_ref)
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
                    for b, r in zip(txt_batches, txt_ref)
                ],
            )
            return [img, txt]

        checks: List[Check] = []
        if check:
            checks += run_checks(fp32, FP32_MIN_COS, "fp32")
            raise_if_failed(checks, out)
        # (target, folder holding its ONNX files, precision, checks)
        outputs: List[Tuple[Path, Path, str, List[Check]]] = []
        int8_target = out if int8 else (Path(int8_out_dir) if int8_out_dir is not None else None)
        if int8_target is not None:
            q = work / "int8"
            q.mkdir()
            quantize_onnx(fp32 / image.file, q / image.file, op_types=image_int8_op_types)
            quantize_onnx(fp32 / text.file, q / text.file, op_types=text_int8_op_types)
            int8_checks: List[Check] = []
            if check:
                int8_checks = run_checks(q, INT8_MIN_COS, "int8")
                raise_if_failed(int8_checks, int8_target)
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
            info.update(
                {
                    "exporter": {
                        f: f"torch {torch.__version__} {e}, opset {OPSET}" for f, e in exporters.items()
                    },
                    "text_dynamic_length": dynamic_length,
                    "self_check": {c.what: round(c.min_cos, 6) for c in target_checks}
                    if check
                    else "skipped",
                }
            )
            if precision == "int8":
                info["quantization"] = quantization_record(
                    image.file, image_int8_op_types, text.file, text_int8_op_types
                )
            manifest = Manifest(
                embedding_dim=dim,
                image=copy.deepcopy(image),
                text=copy.deepcopy(text),
                name=name,
                source=source,
                precision=precision,
                extra=info,
            )
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
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise TypeError(f"{type(model).__name__} has no encode_image / encode_text: not a dual encoder")
    if _has_own_tokenizer(model):  # e.g. the TinyBERT baseline: CLIP's BPE would be wrong
        raise ValueError(
            "export of a student with a Hugging Face text tower (its own WordPiece "
            "tokenizer) is not supported"
        )
    context = int(getattr(model, "context_length", 77) or 77)
    text_tower = text_tower_for(model)
    return export_bundle(
        out_dir,
        image_tower=ImageTower(model),
        text_tower=text_tower,
        tokenizer_json=tokenizer_json,
        image=image_spec_for(model),
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
