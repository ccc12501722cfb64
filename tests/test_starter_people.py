"""The measuring code of benchmarks/bench_starter_people.py (issue 30's third round): the face
cascade as one graph (window geometry, crops, ONNX export) and the person mix, with stand-in
networks of MTCNN's output shapes (the real weights come from facenet-pytorch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import bench_starter_people as B

MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


def _bright(x: torch.Tensor) -> torch.Tensor:
    """MTCNN's input in [-1, 1] -> [0, 1] (black 0, white 1), channel 0."""
    return (x[:, 0:1] + 1.0) / 2.0


class WindowPNet(nn.Module):
    """P-Net's shapes: face probability = the brightness of each 12 x 12 window (stride 2)."""

    def forward(self, x: torch.Tensor) -> tuple:
        m = F.avg_pool2d(_bright(x), 12, stride=2).clamp(0, 1)
        return torch.zeros(x.shape[0], 4, *m.shape[2:]), torch.cat([1 - m, m], dim=1)


class CropNet(nn.Module):
    """R-Net's (or, with ``landmarks``, O-Net's) shapes: probability = the crop's brightness."""

    def __init__(self, landmarks: bool = False) -> None:
        super().__init__()
        self.landmarks = landmarks

    def forward(self, x: torch.Tensor) -> tuple:
        m = _bright(x).mean(dim=(1, 2, 3)).clamp(0, 1).unsqueeze(1)
        out = (torch.zeros(x.shape[0], 4), torch.cat([1 - m, m], dim=1))
        return (out[0], torch.zeros(x.shape[0], 10), out[1]) if self.landmarks else out


def _detector(stage: int) -> B.FaceConfidence:
    return B.FaceConfidence(
        WindowPNet(), CropNet(), CropNet(landmarks=True), image_size=224, mean=MEAN, std=STD, stage=stage
    )


def _pixels(square: bool) -> torch.Tensor:
    """A black 224 x 224 image, normalised like the starter's input, with a white 48 px square
    off the diagonal (x 150..198, y 30..78) so that swapped axes would crop black."""
    img = torch.zeros(1, 3, 224, 224)
    if square:
        img[:, :, 30:78, 150:198] = 1.0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (img - mean) / std


def test_pyramid_starts_at_the_smallest_face_and_shrinks_to_the_window() -> None:
    assert B.pyramid_sizes(224, 24) == [112, 79, 56, 40, 28, 20, 14]
    assert B.pyramid_sizes(224, 224)[0] == 12
    with pytest.raises(ValueError, match="min_face"):
        B.pyramid_sizes(224, 8)
    with pytest.raises(ValueError, match="stage"):
        B.FaceConfidence(WindowPNet(), CropNet(), CropNet(True), image_size=224, mean=MEAN, std=STD, stage=4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_crops_the_windows_where_the_face_is(stage: int) -> None:
    with torch.no_grad():
        face = _detector(stage)(_pixels(True))
        empty = _detector(stage)(_pixels(False))
    # R- and O-Net see only the crops P-Net's best windows give them: a crop off the square
    # (wrong scale, offset or swapped x / y) would be partly black
    assert face.item() > 0.97
    assert empty.item() < 0.01


def test_the_cascade_exports_to_onnx_and_matches_torch(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    det = _detector(3).eval()
    x = torch.cat([_pixels(True), _pixels(False), torch.randn(1, 3, 224, 224)])
    path = tmp_path / "faces.onnx"
    torch.onnx.export(
        det,
        (x[:2],),
        str(path),
        input_names=["x"],
        output_names=["s"],
        dynamic_axes={"x": {0: "b"}, "s": {0: "b"}},
        dynamo=False,
    )
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = det(x).numpy()
    assert got.shape == (3,)
    assert np.abs(got - want).max() < 1e-4


def test_the_person_mix_moves_images_in_proportion_to_their_face_score() -> None:
    img = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    person = np.array([0.0, 0.0, 3.0])
    out = B.with_person(img, np.array([0.0, 1.0]), person, 0.5)
    assert np.allclose(out[0], [1.0, 0.0, 0.0])  # no face: unchanged
    assert np.allclose(out[1], np.array([0.0, 1.0, 1.0]) / np.sqrt(2.0))  # half way to P
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.allclose(B.with_person(img, np.array([1.0, 1.0]), person, 1.0), [[0, 0, 1], [0, 0, 1]])


def test_the_verdict_keeps_a_variant_only_by_the_rule() -> None:
    def m(t1: float, t5: float, h1: float) -> dict:
        return {"tuning": {"r1": t1, "r5": t5, "mrr": 0.9}, "held-out": {"r1": h1, "r5": 1.0, "mrr": 0.5}}

    base = m(0.9, 1.0, 0.8)
    assert B.kept_cell("baseline", base, base) == "recipe 3 stays"
    assert B.kept_cell("person", base, m(0.9, 1.0, 0.85)) == "**yes**"
    assert B.kept_cell("person", base, m(0.9, 1.0, 0.8)) == "no"  # held-out not raised
    assert B.kept_cell("person", base, m(0.9, 0.97, 0.9)) == "no"  # tuning R@5 lowered
