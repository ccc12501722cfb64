"""int8 bundles: onnxruntime dynamic quantization of a bundle's ONNX models, checked against
the fp32 ones. No torch needed (numpy, onnxruntime, tokenizers: the base install).

    from leanclip.quantize import quantize_bundle
    quantize_bundle("bundles/vit-b-32", "bundles/vit-b-32-int8")
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from leanclip._fs import PathLike, staged_dir
from leanclip._selfcheck import (
    DEFAULT_CHECK_TEXTS,
    INT8_MIN_COS,
    Check,
    check_images,
    check_target,
    compare,
    raise_if_failed,
    session,
    tokenize_batch,
)
from leanclip.bundle import BundleError, Manifest, read_manifest, write_manifest

__all__ = ["INT8_OP_TYPES", "INT8_PER_CHANNEL", "quantize_onnx", "quantize_bundle"]

# Dynamic quantization of MatMul/Gemm (transformer and projection weights) and Gather (token
# embeddings, which dominate a small text tower's size). Conv is left in fp32: onnxruntime's
# ConvInteger has no fast x86 kernel and the ViT patch conv is a small share of the time.
INT8_OP_TYPES = ("MatMul", "Gemm", "Gather")
INT8_PER_CHANNEL = True


def quantize_onnx(
    src: Path, dst: Path, op_types: Sequence[str] = INT8_OP_TYPES, per_channel: bool = INT8_PER_CHANNEL
) -> None:
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
                str(src),
                str(dst),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=False,
            )
    finally:
        root.setLevel(level)


def quantization_record(
    image_file: str, image_op_types: Sequence[str], text_file: str, text_op_types: Sequence[str]
) -> dict:
    """What a manifest's ``extra["quantization"]`` says about how a bundle was quantized."""
    return {
        "method": "onnxruntime quantize_dynamic",
        "weight_type": "QInt8",
        "op_types": {image_file: list(image_op_types), text_file: list(text_op_types)},
        "per_channel": INT8_PER_CHANNEL,
    }


def quantize_bundle(
    src_dir: PathLike,
    out_dir: PathLike,
    *,
    check: bool = True,
    image_op_types: Sequence[str] = INT8_OP_TYPES,
    text_op_types: Sequence[str] = INT8_OP_TYPES,
    check_texts: Optional[Sequence[str]] = None,
) -> Path:
    """An int8 copy of an fp32 bundle at ``out_dir``, checked against the fp32 ONNX models
    (min cosine >= 0.99 on ``check_texts`` and fixed test images, else ``ExportError`` and
    nothing is written). ``image_op_types`` / ``text_op_types``: the ONNX op types quantized
    (MiniLM, for one, loses too much with int8 MatMuls: the starter passes ``("Gather",)``)."""
    src = Path(src_dir)
    m = read_manifest(src, verify=True)
    if m.precision != "fp32":
        raise BundleError(f"{src} is a {m.precision} bundle; quantize an fp32 bundle")
    out = Path(out_dir)
    check_target(out)
    with staged_dir(out, check=lambda d: read_manifest(d, verify=True)) as stage:
        quantize_onnx(src / m.image.file, stage / m.image.file, op_types=image_op_types)
        quantize_onnx(src / m.text.file, stage / m.text.file, op_types=text_op_types)
        for f in m.files:
            if f not in (m.image.file, m.text.file):
                shutil.copy2(src / f, stage / f)
        checks: List[Check] = []
        if check:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(src / m.text.tokenizer))
            imgs = check_images(m.image.size, m.image.mean, m.image.std)
            txts = [tokenize_batch(tok, m.text, list(check_texts or DEFAULT_CHECK_TEXTS), None)]
            img_feeds = [{m.image.input: b} for b in imgs]
            checked = [
                ("int8 image encoder", m.image.file, img_feeds, m.image.output),
                ("int8 text encoder", m.text.file, txts, m.text.output),
            ]
            if m.image.similarity_output is not None:  # the optional image-to-image output
                checked.append(("int8 image similarity", m.image.file, img_feeds, m.image.similarity_output))
            for label, f, feeds, outname in checked:
                ref_s, got_s = session(src / f), session(stage / f)
                checks.append(
                    compare(
                        label,
                        INT8_MIN_COS,
                        [
                            (f"batch {i}", ref_s.run([outname], fd)[0], got_s.run([outname], fd)[0])
                            for i, fd in enumerate(feeds)
                        ],
                    )
                )
            raise_if_failed(checks, out)
        extra = dict(m.extra)
        extra["quantization"] = {
            **quantization_record(m.image.file, image_op_types, m.text.file, text_op_types),
            "from": m.model_id,
        }
        extra["self_check_int8_vs_fp32"] = (
            {c.what: round(c.min_cos, 6) for c in checks} if check else "skipped"
        )
        manifest = Manifest(
            embedding_dim=m.embedding_dim,
            image=m.image,
            text=m.text,
            name=m.name,
            source=m.source,
            precision="int8",
            extra=extra,
            files={k: "" for k in m.files},
        )
        write_manifest(stage, manifest)
    return out
