"""The model parts a bundle is exported from: torch modules with exactly the ONNX signatures of a
bundle (``pixel_values -> embeddings``, ``input_ids[, attention_mask] -> embeddings``).

One home for every tower, as open_clip keeps its model parts in one place behind one factory:

* :func:`towers_for` is the factory: the image tower, the text tower and the text reference of
  any dual encoder (an open_clip ``CLIP``, a leanclip teacher or student), what
  :func:`leanclip.export.export_model` exports;
* dual encoders: :class:`ImageTower` (``encode_image``), :class:`CLIPTextTower` (CLIP's causal
  text encoder at any length; also training's truncated student text tower),
  :class:`FixedLengthTextTower` (any ``encode_text`` at the full context);
* the offline starter (:mod:`leanclip.starter`): :class:`StarterImageTower` (zero-shot joint
  vector and image-to-image vector from one classifier), :class:`ZeroShotImageTower` (its joint
  vector alone), :func:`split_classifier`, :class:`JointOutput`.

Needs torch (the ``starter`` extra); open_clip for :class:`CLIPTextTower`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLIPTextTower",
    "DualEncoderTowers",
    "FixedLengthTextTower",
    "ImageTower",
    "JointOutput",
    "PooledFeatures",
    "StarterImageTower",
    "ZeroShotImageTower",
    "split_classifier",
    "text_tower_for",
    "towers_for",
]


# ---------------------------------------------------------------------------------------------
# Dual encoders


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


@dataclass
class DualEncoderTowers:
    """What a dual encoder is exported as: ``image(pixel_values)``, ``text(input_ids)`` and
    ``text_reference``, the text encoder at the full context length that the exported text tower
    is checked against."""

    image: nn.Module
    text: nn.Module
    text_reference: nn.Module


def towers_for(model: nn.Module) -> DualEncoderTowers:
    """The towers of any dual encoder with ``encode_image`` / ``encode_text``: its image tower,
    its best exportable text tower (:func:`text_tower_for`) and the full-length reference."""
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise TypeError(f"{type(model).__name__} has no encode_image / encode_text: not a dual encoder")
    return DualEncoderTowers(ImageTower(model), text_tower_for(model), FixedLengthTextTower(model))


# ---------------------------------------------------------------------------------------------
# The starter's image towers: a classifier's view of an image in a text space


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


class PooledFeatures(nn.Module):
    """EfficientNet's trunk: ``pixels -> (n, 1280)`` globally pooled features (the classifier's input)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net: Any = net  # efficientnet_lite_pytorch.EfficientNet (untyped)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.net._avg_pooling(self.net.extract_features(pixel_values))
        return pooled.flatten(1)


def split_classifier(classifier: nn.Module) -> tuple:
    """``(features, head)`` with ``head(features(x)) == classifier(x)`` in eval mode: the pooled
    penultimate features and the final linear layer. Knows EfficientNet (``extract_features`` /
    ``_fc``; its dropout is the identity in eval) and an ``nn.Sequential`` ending in ``nn.Linear``."""
    if hasattr(classifier, "extract_features") and isinstance(getattr(classifier, "_fc", None), nn.Linear):
        return PooledFeatures(classifier), classifier._fc
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
        return nn.Sequential(*list(classifier)[:-1]), classifier[-1]
    raise TypeError(
        f"cannot split {type(classifier).__name__} into pooled features and a final linear layer "
        "(expected EfficientNet or an nn.Sequential ending in nn.Linear)"
    )


class StarterImageTower(nn.Module):
    """``pixels -> (joint, similarity)``: the zero-shot joint vector and an image-to-image vector.

    joint: ``normalize(p @ E)`` where ``p`` is the softmax of the classifier's logits at
    ``temperature`` restricted to its ``top_k`` classes (all when None) and ``E`` the normalised
    class caption embeddings (with ``top_k=None`` this is :class:`ZeroShotImageTower`).
    similarity: ``normalize(f)`` of the classifier's pooled penultimate features ``f`` (1,280 for
    EfficientNet-Lite0): they tell photos apart, where the joint vectors all lie in the narrow
    cone of the class captions (``benchmarks/results/starter.md`` has the measurements).
    """

    class_embeds: torch.Tensor

    def __init__(
        self,
        classifier: nn.Module,
        class_embeds: torch.Tensor,
        temperature: float,
        *,
        top_k: Optional[int] = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if class_embeds.ndim != 2:
            raise ValueError(f"class_embeds must be (classes, dim), got {tuple(class_embeds.shape)}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.features, self.head = split_classifier(classifier)
        self.register_buffer("class_embeds", F.normalize(class_embeds.detach().float(), dim=-1))
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)

    @property
    def embedding_dim(self) -> int:
        return int(self.class_embeds.shape[1])

    def forward(self, pixel_values: torch.Tensor) -> tuple:
        pooled = self.features(pixel_values)
        logits = self.head(pooled)
        if logits.shape[-1] != self.class_embeds.shape[0]:
            raise ValueError(
                f"classifier gives {logits.shape[-1]} classes but there are "
                f"{self.class_embeds.shape[0]} class embeddings"
            )
        z = logits / self.temperature
        if self.top_k is not None and self.top_k < z.shape[-1]:
            kth = torch.topk(z, self.top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        joint = F.normalize(z.softmax(dim=-1) @ self.class_embeds, dim=-1)
        return joint, F.normalize(pooled, dim=-1)


class JointOutput(nn.Module):
    """The first output of a two-output image tower (what ``export_bundle`` exports and checks)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values)[0]
