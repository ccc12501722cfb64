"""A face-confidence signal for the starter's image tower, from MTCNN's packaged weights.

ImageNet has no class for a person, so the starter's image tower cannot tell a portrait from a
bobsleigh. ``facenet-pytorch`` ships MTCNN's three small networks (P-, R- and O-Net, ~0.5 M
parameters, MIT licence) inside its wheel. :class:`FaceConfidence` runs them on the image tower's
own 224 x 224 input, in one graph that ONNX export can trace (no NMS, no Python loops over
detections), and returns per image the highest face probability the cascade reaches:

* P-Net over a fixed pyramid (smallest face ``min_face`` pixels of the 224 input), its box
  regression applied and the boxes made square, as MTCNN does;
* R-Net on the ``pnet_top`` best P-Net windows of each pyramid level (crops by RoIAlign, 24 px);
* O-Net on the ``rnet_top`` best R-Net windows (48 px).

``stage`` picks which network's probability is the answer (1: P-Net alone, 2: up to R-Net, 3:
the full cascade). MTCNN proper keeps every window above a threshold and merges them; the
starter needs only "is there a face, and how sure", the maximum.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FaceConfidence", "load_mtcnn", "pyramid_sizes"]

# MTCNN's P-Net sees 12 x 12 windows at stride 2; its pyramid shrinks by 0.709 per level
PNET_WINDOW = 12
PNET_STRIDE = 2
PYRAMID_FACTOR = 0.709


def load_mtcnn() -> Tuple[nn.Module, nn.Module, nn.Module]:
    """MTCNN's P-, R- and O-Net with the weights ``facenet-pytorch`` ships, in eval mode."""
    try:
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    except ImportError as exc:
        raise ImportError(
            "the starter's face signal uses MTCNN's weights from the 'facenet-pytorch' package: "
            "pip install 'leanclip[starter]'"
        ) from exc
    return PNet().eval(), RNet().eval(), ONet().eval()


def pyramid_sizes(image_size: int, min_face: int) -> List[int]:
    """Side of each pyramid level: a face of ``min_face`` pixels becomes P-Net's 12-pixel window
    at the first level, and each level is 0.709 of the one before, down to 12 pixels."""
    if min_face < PNET_WINDOW:
        raise ValueError(f"min_face must be at least {PNET_WINDOW} pixels, got {min_face}")
    scale = PNET_WINDOW / min_face
    sizes = []
    while round(image_size * scale) >= PNET_WINDOW:
        sizes.append(int(round(image_size * scale)))
        scale *= PYRAMID_FACTOR
    return sizes


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """MTCNN's ``rerec``: each (x1, y1, x2, y2) box made a square of its longer side, same centre."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    side = torch.maximum(w, h)
    cx = boxes[..., 0] + w * 0.5
    cy = boxes[..., 1] + h * 0.5
    half = side * 0.5
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """MTCNN's box regression: offsets in units of the box's width and height."""
    w = (boxes[..., 2] - boxes[..., 0]).unsqueeze(-1)
    h = (boxes[..., 3] - boxes[..., 1]).unsqueeze(-1)
    return boxes + reg * torch.cat([w, h, w, h], dim=-1)


def _crops(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(B * K, 3, size, size)`` crops of ``x`` at ``boxes`` ``(B, K, 4)`` (pixel corners)."""
    from torchvision.ops import roi_align

    b, k = boxes.shape[:2]
    idx = torch.arange(b, dtype=boxes.dtype, device=boxes.device).repeat_interleave(k).unsqueeze(1)
    rois = torch.cat([idx, boxes.reshape(b * k, 4)], dim=1)
    return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=False)


class FaceConfidence(nn.Module):
    """``pixels (B, 3, S, S) -> (B,)``: the highest face probability of MTCNN's cascade.

    ``pixels`` are the image tower's input, normalised with ``mean`` / ``std`` (per channel, on
    [0, 1] pixels); MTCNN's own input is ``(255 x - 127.5) / 128``.
    """

    in_scale: torch.Tensor
    in_shift: torch.Tensor

    def __init__(
        self,
        pnet: nn.Module,
        rnet: nn.Module,
        onet: nn.Module,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        min_face: int = 24,
        stage: int = 3,
        pnet_top: int = 4,
        rnet_top: int = 4,
    ) -> None:
        super().__init__()
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1 (P-Net), 2 (R-Net) or 3 (O-Net), got {stage}")
        self.pnet, self.rnet, self.onet = pnet.eval(), rnet.eval(), onet.eval()
        self.sizes = pyramid_sizes(image_size, min_face)
        self.image_size = int(image_size)
        self.stage = int(stage)
        self.pnet_top = int(pnet_top)
        self.rnet_top = int(rnet_top)
        # x_mtcnn = (255 (x std + mean) - 127.5) / 128 = x * a + c, per channel
        a = torch.tensor([255.0 * s / 128.0 for s in std]).view(1, 3, 1, 1)
        c = torch.tensor([(255.0 * m - 127.5) / 128.0 for m in mean]).view(1, 3, 1, 1)
        self.register_buffer("in_scale", a)
        self.register_buffer("in_shift", c)

    def _pnet_windows(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``pnet_top`` best P-Net windows per pyramid level: ``(B, K, 4)`` boxes (regressed,
        square, in input pixels) and their probabilities ``(B, K)``."""
        boxes, probs = [], []
        for side in self.sizes:
            scale = side / self.image_size
            level = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            reg, prob = self.pnet(level)
            b, _, h, w = prob.shape
            p = prob[:, 1].reshape(b, h * w)
            k = min(self.pnet_top, h * w)
            top, idx = torch.topk(p, k, dim=1)
            ys = torch.div(idx, w, rounding_mode="floor").to(x.dtype)
            xs = (idx - torch.div(idx, w, rounding_mode="floor") * w).to(x.dtype)
            # MTCNN's generateBoundingBox: cell (i, j) covers [stride*j + 1, stride*j + 12] / scale
            x1 = (PNET_STRIDE * xs + 1.0) / scale
            y1 = (PNET_STRIDE * ys + 1.0) / scale
            x2 = (PNET_STRIDE * xs + PNET_WINDOW) / scale
            y2 = (PNET_STRIDE * ys + PNET_WINDOW) / scale
            r = torch.gather(reg.reshape(b, 4, h * w), 2, idx.unsqueeze(1).expand(b, 4, k))
            box = _regress(torch.stack([x1, y1, x2, y2], dim=-1), r.transpose(1, 2))
            boxes.append(_square(box))
            probs.append(top)
        return torch.cat(boxes, dim=1), torch.cat(probs, dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values * self.in_scale + self.in_shift
        boxes, probs = self._pnet_windows(x)
        if self.stage == 1:
            return probs.max(dim=1).values
        b, k = boxes.shape[:2]
        reg, prob = self.rnet(_crops(x, boxes, 24))
        p = prob[:, 1].reshape(b, k)
        if self.stage == 2:
            return p.max(dim=1).values
        boxes = _square(_regress(boxes, reg.reshape(b, k, 4)))
        kk = min(self.rnet_top, k)
        _, idx = torch.topk(p, kk, dim=1)
        best = torch.gather(boxes, 1, idx.unsqueeze(-1).expand(b, kk, 4))
        prob = self.onet(_crops(x, best, 48))[2]
        return prob[:, 1].reshape(b, kk).max(dim=1).values
