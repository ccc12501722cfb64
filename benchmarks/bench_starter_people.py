"""Issue 30, item 5, third round: a person signal for the starter, from MTCNN's packaged weights.

    python -m benchmarks.bench_starter_people [--cache DIR] [--results PATH]

Recipe 3 misses, on the held-out queries, concepts ImageNet has no class for, most of them a
person (the astronaut, Grace Hopper). ``facenet-pytorch`` ships MTCNN's face-detection weights
in its wheel (2 MB, MIT); :class:`FaceConfidence` (below) runs the cascade on the
image tower's own 224 x 224 input in one ONNX-exportable graph and gives each photo its highest
face probability ``s``. The image vector then moves toward a "person" row ``P`` in proportion:

    image = unit((1 - w s) unit(p E) + w s P)

where ``p E`` is recipe 3's (T=3, top-10 classes, gloss weight 0.2) and ``P`` the normalised
mean of the normalised MiniLM embeddings of a fixed set of person captions.

Everything below was fixed (and committed) before the first measurement; no detector had been
run on the sample photos then. Variants (24):

* detector stage: P-Net alone (``stage=1``), up to R-Net (2), the full cascade to O-Net (3);
  pyramid from 24-pixel faces (7 levels, 112 .. 14 px), the 4 best P-Net windows per level to
  R-Net, the 4 best R-Net windows to O-Net;
* person captions: "a person" = ("a photo of a person.",); "people" = ("a photo of a person.",
  "a portrait of a person.", "a photo of a man.", "a photo of a woman.");
* weight ``w`` in {0.2, 0.4, 0.6, 0.8}.

A second idea of the brief, another small model with packaged weights whose classes cover
scenes or people, was looked for and not found (no Places365 or person classifier with weights
in a PyPI wheel); nothing is measured for it.

Choice (round 2's rule): the tuning captions alone pick one candidate among all variants and
recipe 3 (tuning R@1, then tuning MRR; a tie keeps recipe 3, listed first). It is kept only if
it is not recipe 3, does not lower tuning R@1 or R@5, and raises held-out R@1. The held-out
queries are only reported. If one is kept, its int8 figures, size and latency come from bundles
built the repo's way and measured through leanclip.Encoder against recipe 3's.

Outcome (benchmarks/results/starter.md, "round 3"): no variant reaches recipe 3's tuning R@1, so
recipe 3 stays. The detector, first written as ``leanclip/starter_faces.py`` in the plan's commit,
lives here since it is not part of the starter.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import bench_starter_heldout as H
from benchmarks import bench_starter_ideas as I
from benchmarks import bench_starter_quality as Q

RESULTS = Q.ROOT / "benchmarks" / "results" / "starter.md"
BEGIN = "<!-- bench_starter_people: begin (written by benchmarks/bench_starter_people.py) -->"
END = "<!-- bench_starter_people: end -->"
STAGES = {1: "P-Net", 2: "P+R-Net", 3: "P+R+O-Net"}
PERSON_CAPTIONS: Dict[str, tuple] = {
    "a person": ("a photo of a person.",),
    "people": ("a photo of a person.", "a portrait of a person.", "a photo of a man.", "a photo of a woman."),
}
WEIGHTS = (0.2, 0.4, 0.6, 0.8)
RECIPE3_GLOSS = 0.2

# ---------------------------------------------------------------------------------------------
# the detector: MTCNN's cascade as one traceable graph

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
            "the face signal uses MTCNN's weights from the 'facenet-pytorch' package: "
            "pip install facenet-pytorch==2.5.3 (2.6 pins torch < 2.3)"
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

    No NMS and no Python loop over detections, so ONNX export can trace it into the image graph:

    * P-Net over a fixed pyramid (smallest face ``min_face`` pixels of the input), its box
      regression applied and the boxes made square, as MTCNN does;
    * R-Net on the ``pnet_top`` best P-Net windows of each level (RoIAlign crops, 24 px);
    * O-Net on the ``rnet_top`` best R-Net windows (48 px).

    ``stage`` picks which network's probability is the answer (1: P-Net, 2: R-Net, 3: O-Net).
    MTCNN proper keeps every window above a threshold and merges them; a signal for the image
    vector needs only the maximum.

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


# ---------------------------------------------------------------------------------------------
# measuring


def face_scores(cache: Path, names: Sequence[str]) -> Dict[int, np.ndarray]:
    """Per stage, each sample photo's face confidence (the Encoder's preprocessing, torch; cached)."""
    f = cache / "face_scores.npz"
    if f.is_file():
        got = dict(np.load(f))
        if list(got["names"]) == list(names):
            return {s: got[f"stage{s}"] for s in STAGES}
    from leanclip.encoder import Encoder, preprocess_image
    from leanclip.starter import EFFICIENTNET_MEAN, EFFICIENTNET_STD, IMAGE_SIZE

    photos = {p.name: p for p in Q.sample_photos(cache / "photos")}
    px = torch.from_numpy(
        np.stack(
            [
                preprocess_image(
                    Encoder.load_image(photos[n]), IMAGE_SIZE, EFFICIENTNET_MEAN, EFFICIENTNET_STD
                )
                for n in names
            ]
        )
    )
    nets = load_mtcnn()
    out = {}
    for s in STAGES:
        det = FaceConfidence(
            *nets, image_size=IMAGE_SIZE, mean=EFFICIENTNET_MEAN, std=EFFICIENTNET_STD, stage=s
        )
        with torch.no_grad():
            out[s] = det(px).numpy().astype(np.float64)
    np.savez(f, names=np.array(list(names)), **{f"stage{s}": v for s, v in out.items()})
    return out


def with_person(img: np.ndarray, s: np.ndarray, person: np.ndarray, weight: float) -> np.ndarray:
    """unit((1 - w s) img + w s P) per row (``img`` unit rows, ``s`` in [0, 1])."""
    a = (weight * s)[:, None]
    return Q._unit((1.0 - a) * Q._unit(img) + a * Q._unit(person)[None, :])


def measure(f: I.Features) -> Dict[str, Any]:
    """Recipe 3 and every variant (docstring), recipe 3 first (``rows``); each row's ranks of the
    targets per query set (``ranks``, by (idea, variant)); the face ``scores``."""
    E = I.class_matrices(f)
    q = f.queries()
    base = Q.joint_head(f.logits, I.weighted_rows(E["name"], E["gloss"], RECIPE3_GLOSS), 3.0, 10)
    scores = face_scores(f.cache, f.names)
    people = {k: Q._unit(Q._unit(f.embed(list(v))).mean(0)) for k, v in PERSON_CAPTIONS.items()}
    images = {("baseline", "recipe 3: T=3, top-10, gloss weight 0.2"): base}
    for s, stage in STAGES.items():
        for label, P in people.items():
            for w in WEIGHTS:
                images[f"person signal, {stage}", f"'{label}', w = {w}"] = with_person(base, scores[s], P, w)
    ranks = {
        key: {k: H.ranks(H.scores_of(q[k], img), t) for k, t in f.targets.items()}
        for key, img in images.items()
    }
    rows: List[I.Row] = [(*key, {k: H.metrics(r) for k, r in rk.items()}) for key, rk in ranks.items()]
    return {"rows": rows, "ranks": ranks, "scores": scores}


def rank_changes(
    f: I.Features, ranks: Dict[Tuple[str, str], Dict[str, np.ndarray]], key: Tuple[str, str]
) -> List[List[str]]:
    """The queries whose target moves between recipe 3 (the first key) and ``key``."""
    base = ranks[next(iter(ranks))]
    out = []
    for k, r in ranks[key].items():
        for i in np.flatnonzero(r != base[k]):
            photo = f.names[int(f.targets[k][i])]
            out.append([key[0], key[1], k, f.texts[k][i], photo, f"{int(base[k][i])} -> {int(r[i])}"])
    return out


def kept_cell(idea: str, base: I.Metrics, m: I.Metrics) -> str:
    """The overall pick's verdict: recipe 3 picked stays; a variant is kept only by the rule."""
    if idea == "baseline":
        return "recipe 3 stays"
    return "**yes**" if H.kept(base, m) else "no"


def report(f: I.Features, info: Dict[str, Any]) -> str:
    from benchmarks import _harness as Hh

    rows, scores, names = info["rows"], info["scores"], f.names
    base = rows[0][2]
    table = I.pick_table(rows, lambda idea, pick, overall, m: kept_cell(idea, base, m) if overall else "")
    picks = H.chosen(rows[1:])
    top = I.overall_pick(rows)
    text = "## Issue 30, round 3: a person signal from MTCNN's packaged weights\n\n"
    text += Hh.header("Starter people", ["torch", "onnxruntime", "facenet-pytorch"]).replace(
        "# Starter people\n\n", ""
    )
    text += (
        "\nTorch features of the 12 sample photos, cosine ranking; 36 tuning captions (one = 0.028), 48 "
        "held-out queries (one = 0.021). The variants and the rule were fixed and committed before the first "
        "measurement (`benchmarks/bench_starter_people.py`). The tuning set alone picks one candidate among all "
        "rows, recipe 3 included (R@1, then MRR; a tie keeps recipe 3). It is kept only if it is not recipe 3, "
        "does not lower tuning R@1 or R@5 and raises held-out R@1. The issue's target: held-out R@1 >= 0.85, "
        "R@5 >= 0.97.\n\n"
    )
    text += Hh.markdown_table(
        I.pick_columns("best in idea"),
        table,
    )
    text += f"\n\nOverall pick on the tuning set: {top[0]}, {top[1]}.\n\nFace confidence per photo:\n\n"
    text += Hh.markdown_table(
        ["photo", *STAGES.values()],
        [[n, *[f"{scores[s][i]:.3f}" for s in STAGES]] for i, n in enumerate(names)],
    )
    changes = [
        c for idea, (variant, _) in picks.items() for c in rank_changes(f, info["ranks"], (idea, variant))
    ]
    text += "\n\nWhat each idea's best variant (on tuning) changes against recipe 3 (rank of the photo, 0 = first):\n\n"
    text += Hh.markdown_table(["idea", "variant", "set", "query", "photo", "rank"], changes)
    return text + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Q.DEFAULT_CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    f = I.Features(args.cache)
    text = report(f, measure(f))
    H.write_section(text, args.results, begin=BEGIN, end=END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
