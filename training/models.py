"""Teacher and student dual encoders, and leanclip training checkpoints.

Every model here exposes the training-side interface of docs/ARCHITECTURE.md:
``encode_image(pixels (n,3,S,S)) -> (n,d)``, ``encode_text(tokens (n,L)) -> (n,d)`` (unnormalized),
and the attributes ``image_size``, ``image_mean``, ``image_std``, ``context_length``.

* Teacher: open_clip ``ViT-B-32`` (or any open_clip name), built by ``open_clip.create_model``.
* Student (paper section 4.1): a timm image backbone (``num_classes=0``) plus a linear projection
  to the teacher's embedding space, and a text tower made of the teacher's token and positional
  embeddings, a chosen subset of its transformer layers, its final LayerNorm and projection,
  all copied from the teacher.

``tiny=True`` builds the same code with shrunk widths and depths (vocab 49408 and context 77 are
kept so open_clip's tokenizer still works) for tests on a CPU without any downloaded weights.
A checkpoint stores ``model_config`` next to the ``state_dict``; ``load_model`` rebuilds it.

Table 1's baseline "f_v^S + f_t^TinyBERT" (``build_hf_student``) replaces the student text tower by
a Hugging Face BERT-style encoder + projection with its own WordPiece tokenizer; its config holds
the HF config dict and tokenizer.json, so checkpoints rebuild without the hub. Callers tokenize
with ``tokenize_for(model, texts)``, which uses such a model's own tokenizer.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import open_clip
import timm
import torch
import torch.nn.functional as F
from torch import nn

from leanclip._fs import PathLike, atomic_write_with
from leanclip.minilm import student_layers, tiny_wordpiece_tokenizer_json
from leanclip.towers import CLIPTextTower  # the one home of CLIP's causal text tower
from training.weights import local_weight

CHECKPOINT_FORMAT = "leanclip-training-checkpoint"
CHECKPOINT_VERSION = 1

# The paper's student image backbone and a CPU-fast alternative (see ../shared/ANCHORS.md).
STUDENT_IMAGE_PRESETS = ("vit_small_patch16_224", "vit_small_patch32_224")

# Shrunk shapes used by ``tiny=True``: same code paths, random weights, seconds on a CPU.
TINY_EMBED_DIM = 32
TINY_IMAGE_SIZE = 32
TINY_TEACHER_VISION = {
    "image_size": TINY_IMAGE_SIZE,
    "layers": 2,
    "width": 64,
    "patch_size": 8,
    "head_width": 32,
}
TINY_TEACHER_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4}
TINY_STUDENT_TIMM = {"img_size": TINY_IMAGE_SIZE, "embed_dim": 32, "depth": 2, "num_heads": 2}


class CheckpointError(ValueError):
    """A file is not a readable leanclip training checkpoint."""


# --------------------------------------------------------------------------------------------
# Teacher


def _teacher_model_cfg(name: str, tiny: bool, quick_gelu: bool) -> dict[str, Any]:
    base = open_clip.get_model_config(name)
    if base is None:
        raise ValueError(
            f"unknown open_clip model name {name!r}; known: {', '.join(open_clip.list_models()[:20])}, ..."
        )
    cfg = copy.deepcopy(base)
    if tiny:
        cfg["embed_dim"] = TINY_EMBED_DIM
        cfg["vision_cfg"] = dict(TINY_TEACHER_VISION)
        cfg["text_cfg"] = dict(TINY_TEACHER_TEXT)
    cfg["quick_gelu"] = bool(quick_gelu or cfg.get("quick_gelu", False))
    return cfg


def _set_interface_attributes(
    model: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float], context_length: int
) -> None:
    model.image_size = int(image_size)
    model.image_mean = tuple(float(v) for v in mean)
    model.image_std = tuple(float(v) for v in std)
    model.context_length = int(context_length)


def _create_teacher(config: Mapping[str, Any], pretrained: str | None) -> nn.Module:
    cfg = copy.deepcopy(dict(config["open_clip_cfg"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights loaded" is expected when rebuilding
        model = open_clip.create_model(config["name"], pretrained=pretrained, **cfg)
    vision = cfg["vision_cfg"]
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    _set_interface_attributes(
        model,
        size,
        open_clip.OPENAI_DATASET_MEAN,
        open_clip.OPENAI_DATASET_STD,
        cfg["text_cfg"].get("context_length", 77),
    )
    model.leanclip_config = copy.deepcopy(dict(config))
    return model


def build_teacher(name: str = "ViT-B-32", pretrained: str | None = "openai", tiny: bool = False) -> nn.Module:
    """An open_clip dual encoder. ``pretrained``: an open_clip tag ("openai"), a local open_clip
    checkpoint file, a leanclip training checkpoint (e.g. the fine-tuned teacher T'), or None
    for random weights."""
    if pretrained is not None and Path(pretrained).is_file() and _is_leanclip_checkpoint(pretrained):
        model = load_model(pretrained)
        if model.leanclip_config.get("kind") != "teacher":
            raise ValueError(
                f"{pretrained} is a leanclip {model.leanclip_config.get('kind')} checkpoint, not a teacher"
            )
        return model
    if (
        pretrained is not None
        and not Path(pretrained).exists()
        and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))
    ):
        raise FileNotFoundError(f"teacher checkpoint not found: {pretrained}")
    # OpenAI's weights were trained with QuickGELU; open_clip's plain config uses nn.GELU.
    quick_gelu = pretrained == "openai"
    config = {"kind": "teacher", "name": name, "open_clip_cfg": _teacher_model_cfg(name, tiny, quick_gelu)}
    if pretrained is not None and not Path(pretrained).exists():  # an open_clip tag
        local = local_weight("open_clip", f"{name}:{pretrained}")  # LEANCLIP_WEIGHTS: never the network
        if local is not None:
            return _create_teacher(config, str(local))
    return _create_teacher(config, pretrained)


# --------------------------------------------------------------------------------------------
# Student


class StudentDualEncoder(nn.Module):
    """timm image backbone + linear projection; truncated CLIP text tower, or (``text.kind:
    hf``) a Hugging Face BERT-style encoder + projection with its own WordPiece tokenizer."""

    def __init__(
        self,
        config: Mapping[str, Any],
        visual: nn.Module | None = None,
        hf_text_model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.leanclip_config = copy.deepcopy(dict(config))
        img = config["image"]
        if visual is None:
            visual = timm.create_model(
                img["backbone"], pretrained=False, num_classes=0, **img.get("timm_kwargs", {})
            )
        self.visual = visual
        embed_dim = int(config["embed_dim"])
        self.image_projection = nn.Linear(self.visual.num_features, embed_dim, bias=False)
        txt = config["text"]
        self.text: nn.Module
        if txt.get("kind", "clip") == "hf":
            self.text = HFTextTower(txt, embed_dim, model=hf_text_model)
        else:
            self.text = CLIPTextTower(
                vocab_size=txt["vocab_size"],
                context_length=txt["context_length"],
                width=txt["width"],
                heads=txt["heads"],
                layers=len(txt["layers"]),
                output_dim=embed_dim,
                mlp_ratio=txt.get("mlp_ratio", 4.0),
                quick_gelu=txt.get("quick_gelu", False),
            )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.get("logit_scale", 4.6052))))
        _set_interface_attributes(self, img["image_size"], img["mean"], img["std"], txt["context_length"])

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_projection(self.visual(pixels))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (n, context_length) for ``encode_text``: open_clip's BPE for the CLIP text
        tower, the tower's own WordPiece tokenizer for a Hugging Face one."""
        if isinstance(self.text, HFTextTower):
            return self.text.tokenize(texts)
        return tokenize(texts, int(self.context_length))

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels, normalize=True), self.encode_text(tokens, normalize=True)


# Shrunk BERT used by ``build_hf_student(tiny=True)``: random weights, built locally.
TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
HF_POOLING = ("cls", "mean")


# the words of the tiny WordPiece tokenizer of ``build_hf_student(tiny=True)`` (spelled out
# letter by letter otherwise: leanclip.minilm.tiny_wordpiece_tokenizer_json)
TINY_WORDPIECE_WORDS = ("a", "an", "the", "photo", "image", "picture", "of", "with", "in", "is", "that")


def _hf_model_from_config(hf_config: Mapping[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    cfg = dict(hf_config)
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    try:  # BERT's pooler is unused (and would leave DDP with parameters without gradients)
        return AutoModel.from_config(cfg, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(cfg)


class HFTextTower(nn.Module):
    """A Hugging Face encoder (e.g. TinyBERT) + a linear projection to the joint space.

    ``encode_text`` keeps the one-tensor interface: token ids padded with ``pad_id`` to the
    context length; the attention mask is ``tokens != pad_id``. Pooling: the [CLS] state or the
    mean over unpadded positions. The config holds the HF config dict and the tokenizer.json
    text, so a checkpoint rebuilds the tower without the hub."""

    def __init__(self, config: Mapping[str, Any], output_dim: int, model: nn.Module | None = None) -> None:
        super().__init__()
        if config.get("pooling", "cls") not in HF_POOLING:
            raise ValueError(f"text pooling must be one of {HF_POOLING}, got {config.get('pooling')!r}")
        self.pooling = config.get("pooling", "cls")
        self.context_length = int(config["context_length"])
        self.pad_id = int(config["pad_id"])
        self._tokenizer_json = config["tokenizer_json"]
        self._tokenizer: Any = None
        self.model = model if model is not None else _hf_model_from_config(config["hf_config"])
        self.projection = nn.Linear(int(config["width"]), output_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=int(config["width"]) ** -0.5)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self._tokenizer_json)
            tok.enable_truncation(max_length=self.context_length)
            tok.enable_padding(
                length=self.context_length,
                pad_id=self.pad_id,
                pad_token=tok.id_to_token(self.pad_id) or "[PAD]",
            )
            self._tokenizer = tok
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle: rebuild the tokenizer lazily
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        encodings = self.tokenizer.encode_batch([str(t) for t in texts])
        if not encodings:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"token sequence length {tokens.shape[1]} exceeds the context length {self.context_length}"
            )
        mask = (tokens != self.pad_id).long()
        hidden = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.projection(pooled)


def select_text_layers(total: int, text_layers: int | Sequence[int], spacing: str = "first") -> list[int]:
    """Which teacher layers the student text tower keeps: an explicit list of indices, or N
    layers chosen as the first N (paper default) or evenly spaced (always keeping the last)."""
    if isinstance(text_layers, int):
        n = text_layers
        if not 1 <= n <= total:
            raise ValueError(f"text_layers={n} must be between 1 and the teacher's {total} layers")
        if spacing == "first":
            return list(range(n))
        if spacing == "even":
            return student_layers(total, n)
        raise ValueError(f"unknown layer spacing {spacing!r}; use 'first' or 'even'")
    layers = [int(i) for i in text_layers]
    if not layers or any(not 0 <= i < total for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"text layer indices {layers} must be distinct and in [0, {total})")
    return layers


def _timm_create(backbone: str, image_pretrained: str | None, kwargs: dict[str, Any]) -> nn.Module:
    if image_pretrained is None:
        return timm.create_model(backbone, pretrained=False, num_classes=0, **kwargs)
    path = Path(image_pretrained)
    if path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"image backbone weights {path} is not a file")
        return timm.create_model(
            backbone, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    if os.sep in image_pretrained or image_pretrained.endswith((".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"image backbone weights not found: {image_pretrained}")
    # A timm pretrained tag, e.g. "augreg_in21k" -> "vit_small_patch16_224.augreg_in21k".
    name = backbone if image_pretrained in ("", "default") else f"{backbone}.{image_pretrained}"
    local = local_weight("timm", name)  # LEANCLIP_WEIGHTS: never the network
    if local is not None:
        return timm.create_model(
            name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(local)}, **kwargs
        )
    return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)


def build_student(
    image_backbone: str = "vit_small_patch16_224",
    text_layers: int | Sequence[int] = 6,
    teacher: nn.Module | None = None,
    image_pretrained: str | None = None,
    tiny: bool = False,
    text_layer_spacing: str = "first",
) -> StudentDualEncoder:
    """The paper's student, initialised from ``teacher`` (an open_clip CLIP built by
    ``build_teacher``): text embeddings, chosen layers, final LN, projection and logit scale are
    copied; the image backbone comes from timm (``image_pretrained``: None for random weights, a
    timm pretrained tag such as "augreg_in21k", or a local weights file)."""
    if teacher is None:
        teacher = build_teacher(pretrained=None, tiny=tiny)
    tcfg = teacher.leanclip_config["open_clip_cfg"]
    text_cfg = tcfg["text_cfg"]
    total = len(teacher.transformer.resblocks)
    layers = select_text_layers(total, text_layers, text_layer_spacing)
    timm_kwargs = dict(TINY_STUDENT_TIMM) if tiny else {}
    visual = _timm_create(image_backbone, image_pretrained, timm_kwargs)
    data_cfg = timm.data.resolve_data_config({}, model=visual)
    # timm's pretrained config keeps 224 even when img_size is overridden (tiny models)
    image_size = int(timm_kwargs.get("img_size", data_cfg["input_size"][-1]))
    config: dict[str, Any] = {
        "kind": "student",
        "embed_dim": int(tcfg["embed_dim"]),
        "logit_scale": float(teacher.logit_scale.detach().reshape(-1)[0]),
        "image": {
            "backbone": image_backbone,
            "timm_kwargs": timm_kwargs,
            "image_size": image_size,
            "mean": list(data_cfg["mean"]),
            "std": list(data_cfg["std"]),
            "pretrained": image_pretrained,
        },
        "text": {
            "vocab_size": text_cfg.get("vocab_size", 49408),
            "context_length": text_cfg.get("context_length", 77),
            "width": text_cfg.get("width", 512),
            "heads": text_cfg.get("heads", 8),
            "mlp_ratio": text_cfg.get("mlp_ratio", 4.0),
            "quick_gelu": bool(tcfg.get("quick_gelu", False)),
            "layers": layers,
            "teacher_layers": total,
        },
    }
    student = StudentDualEncoder(config, visual=visual)
    _copy_text_from_teacher(student, teacher, layers)
    return student


def _copy_text_from_teacher(student: StudentDualEncoder, teacher: nn.Module, layers: Sequence[int]) -> None:
    with torch.no_grad():
        student.text.token_embedding.weight.copy_(teacher.token_embedding.weight)
        student.text.positional_embedding.copy_(teacher.positional_embedding)
        for dst, src in zip(student.text.transformer.resblocks, layers):
            dst.load_state_dict(teacher.transformer.resblocks[src].state_dict())
        student.text.ln_final.load_state_dict(teacher.ln_final.state_dict())
        projection = teacher.text_projection
        weight = projection.weight.T if isinstance(projection, nn.Linear) else projection
        student.text.text_projection.copy_(weight)
        student.logit_scale.copy_(teacher.logit_scale.detach().reshape(()))


def build_hf_student(
    image_backbone: str = "vit_small_patch16_224",
    text_model: str = "huawei-noah/TinyBERT_General_4L_312D",
    teacher: nn.Module | None = None,
    image_pretrained: str | None = None,
    tiny: bool = False,
    pooling: str = "cls",
    context_length: int = 77,
    text_pretrained: bool = True,
) -> StudentDualEncoder:
    """Table 1's compression baseline "f_v^S + f_t^TinyBERT": a timm image backbone and a Hugging
    Face BERT-style text encoder (``text_model``: a hub name or a local directory, loaded with
    ``transformers.AutoModel``/``AutoTokenizer``; ``text_pretrained=False`` keeps the architecture
    with random weights), each with a linear projection to the teacher's embedding dim. Nothing
    is copied from the teacher but the embedding dim and the logit scale. ``tiny=True`` builds a
    tiny random BERT and a local WordPiece tokenizer instead (no network)."""
    if teacher is None:
        teacher = build_teacher(pretrained=None, tiny=tiny)
    if pooling not in HF_POOLING:
        raise ValueError(f"text pooling must be one of {HF_POOLING}, got {pooling!r}")
    if tiny:
        from transformers import BertConfig

        tokenizer_json = tiny_wordpiece_tokenizer_json(TINY_WORDPIECE_WORDS, spell_out=True)
        from tokenizers import Tokenizer

        vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size()
        hf_config = BertConfig(vocab_size=vocab_size, **TINY_BERT).to_dict()
        hf_model = _hf_model_from_config(hf_config)
        text_model = "tiny-bert"
    else:
        from transformers import AutoModel, AutoTokenizer

        source = Path(text_model)
        # "org/name" is a hub name; a path starts with / . or ~ (or exists)
        if text_model.startswith(("/", ".", "~")) and not source.is_dir():
            raise FileNotFoundError(f"text encoder directory not found: {text_model}")
        # a hub name: from LEANCLIP_WEIGHTS when set (never the network); the config keeps the name
        local = None if source.is_dir() else local_weight("hf", text_model)
        load_from = str(local) if local is not None else text_model
        tok = AutoTokenizer.from_pretrained(load_from)
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{text_model}: needs a fast (tokenizers) tokenizer")
        tokenizer_json = tok.backend_tokenizer.to_str()
        if text_pretrained:
            try:
                hf_model = AutoModel.from_pretrained(load_from, add_pooling_layer=False)
            except TypeError:
                hf_model = AutoModel.from_pretrained(load_from)
            hf_config = hf_model.config.to_dict()
        else:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(load_from).to_dict()
            hf_model = _hf_model_from_config(hf_config)
    from tokenizers import Tokenizer

    probe = Tokenizer.from_str(tokenizer_json)
    pad_id = probe.token_to_id("[PAD]")
    if pad_id is None:
        pad_id = hf_config.get("pad_token_id") or 0
    context_length = min(int(context_length), int(hf_config.get("max_position_embeddings", 512)))
    timm_kwargs = dict(TINY_STUDENT_TIMM) if tiny else {}
    visual = _timm_create(image_backbone, image_pretrained, timm_kwargs)
    data_cfg = timm.data.resolve_data_config({}, model=visual)
    image_size = int(timm_kwargs.get("img_size", data_cfg["input_size"][-1]))
    embed_dim = int(teacher.leanclip_config["open_clip_cfg"]["embed_dim"])
    config: dict[str, Any] = {
        "kind": "student",
        "embed_dim": embed_dim,
        "logit_scale": float(teacher.logit_scale.detach().reshape(-1)[0]),
        "image": {
            "backbone": image_backbone,
            "timm_kwargs": timm_kwargs,
            "image_size": image_size,
            "mean": list(data_cfg["mean"]),
            "std": list(data_cfg["std"]),
            "pretrained": image_pretrained,
        },
        "text": {
            "kind": "hf",
            "name": text_model,
            "hf_config": hf_config,
            "tokenizer_json": tokenizer_json,
            "pooling": pooling,
            "context_length": context_length,
            "pad_id": int(pad_id),
            "width": int(hf_config["hidden_size"]),
        },
    }
    return StudentDualEncoder(config, visual=visual, hf_text_model=hf_model)


def build_student_from_settings(
    m: Mapping[str, Any], teacher: nn.Module, tiny: bool = False
) -> StudentDualEncoder:
    """The student a stage-1/2 config's ``model:`` section describes: with ``text_encoder`` (a
    Hugging Face name or directory; ``text_pooling``, ``text_context_length``) the HF-text
    baseline of ``build_hf_student``, else the paper's student of ``build_student``."""
    backbone = m.get("image_backbone", "vit_small_patch16_224")
    if m.get("text_encoder"):
        return build_hf_student(
            backbone,
            str(m["text_encoder"]),
            teacher=teacher,
            image_pretrained=m.get("image_pretrained"),
            tiny=tiny,
            pooling=m.get("text_pooling", "cls"),
            context_length=int(m.get("text_context_length", 77)),
            text_pretrained=bool(m.get("text_pretrained", True)),
        )
    return build_student(
        backbone,
        m.get("text_layers", 6),
        teacher=teacher,
        image_pretrained=m.get("image_pretrained"),
        tiny=tiny,
        text_layer_spacing=m.get("text_layer_spacing", "first"),
    )


def student_with_teacher_text(student: StudentDualEncoder, teacher: nn.Module) -> StudentDualEncoder:
    """The student's image tower paired with a full copy of the teacher's text tower: the
    paper's Table-2 setting, where ablations touch only the image encoder and the text encoder
    stays the fine-tuned teacher's (T')."""
    total = len(teacher.transformer.resblocks)
    config = copy.deepcopy(student.leanclip_config)
    text_cfg = teacher.leanclip_config["open_clip_cfg"]["text_cfg"]
    if config["text"].get("kind", "clip") == "hf":  # replace the HF tower by a CLIP one
        config["text"] = {
            "vocab_size": text_cfg.get("vocab_size", 49408),
            "context_length": text_cfg.get("context_length", 77),
        }
    config["text"].update(
        {
            "layers": list(range(total)),
            "teacher_layers": total,
            "width": text_cfg.get("width", 512),
            "heads": text_cfg.get("heads", 8),
            "mlp_ratio": text_cfg.get("mlp_ratio", 4.0),
            "quick_gelu": bool(teacher.leanclip_config["open_clip_cfg"].get("quick_gelu", False)),
        }
    )
    combined = StudentDualEncoder(config, visual=student.visual)
    combined.image_projection = student.image_projection
    _copy_text_from_teacher(combined, teacher, list(range(total)))
    with torch.no_grad():
        combined.logit_scale.copy_(student.logit_scale)
    return combined


# --------------------------------------------------------------------------------------------
# Checkpoints


def tower_parameters(model: nn.Module, side: str) -> list[str]:
    """Names of the parameters of the image or the text tower of a teacher (open_clip CLIP) or a
    student (``visual`` + ``image_projection`` / ``text``); the logit scale is in neither."""
    if side not in ("image", "text"):
        raise ValueError(f"side must be 'image' or 'text', got {side!r}")
    image_prefixes = ("visual.", "image_projection.")
    names = [n for n, _ in model.named_parameters() if n != "logit_scale"]
    return [n for n in names if n.startswith(image_prefixes) == (side == "image")]


def model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "leanclip_config", None)
    if config is None:
        raise ValueError("model was not built by training.models (no leanclip_config attribute)")
    return copy.deepcopy(config)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through a sibling temporary renamed over ``path`` (``leanclip._fs``): a
    crash mid-write never leaves a truncated checkpoint behind."""
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(path: PathLike, model: nn.Module, extra: Mapping[str, Any] | None = None) -> None:
    """Save ``model`` (teacher or student) with its config; ``extra`` holds training state
    (optimizer, scheduler, data position, RNG) for exact resumption."""
    unwrapped = getattr(model, "module", model)  # DistributedDataParallel
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model_config(unwrapped),
        "state_dict": unwrapped.state_dict(),
    }
    if extra:
        payload.update(extra)
    atomic_torch_save(payload, path)


def _is_leanclip_checkpoint(path: PathLike) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a leanclip training checkpoint (no 'format': 'leanclip-training-checkpoint' entry)"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')} is not "
            f"supported (expected {CHECKPOINT_VERSION})"
        )
    return payload


def build_from_config(config: Mapping[str, Any]) -> nn.Module:
    kind = config.get("kind")
    if kind == "teacher":
        return _create_teacher(config, pretrained=None)
    if kind == "student":
        return StudentDualEncoder(config)
    raise CheckpointError(f"unknown model kind {kind!r} in checkpoint config")


def load_model(path: PathLike) -> nn.Module:
    """Rebuild the teacher or student saved by ``save_checkpoint`` (eval mode, on the CPU)."""
    payload = read_checkpoint(path)
    model = build_from_config(payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def tokenize(texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's CLIP BPE tokenizer (the teacher's and the CLIP-text student's)."""
    return open_clip.tokenize(list(texts), context_length=context_length)


def tokenize_for(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """Token ids for ``model.encode_text``: the model's own ``tokenize`` when it has one (a
    student with a Hugging Face text tower), else open_clip's at ``model.context_length``."""
    unwrapped = getattr(model, "module", model)  # DistributedDataParallel
    own = getattr(unwrapped, "tokenize", None)
    if callable(own):
        return own(list(texts))
    return tokenize(texts, int(unwrapped.context_length))


def has_own_tokenizer(model: nn.Module) -> bool:
    """True when ``model`` tokenizes differently from the CLIP teacher (its token ids must not
    be fed to the teacher)."""
    unwrapped = getattr(model, "module", model)
    text = getattr(unwrapped, "text", None)
    return isinstance(text, HFTextTower) or bool(getattr(unwrapped, "own_tokenizer", False))
