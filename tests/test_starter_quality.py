"""The starter's issue-18 image tower (top-k, temperature, similarity output) and the quality
benchmark's measuring code (query sets, ranks, augmentations, the results section).

Everything here runs on tiny stand-ins in well under a second per test; the real-weights numbers
are in benchmarks/results/starter.md (``python -m benchmarks.bench_starter_quality``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks import bench_starter_quality as Q
from leanclip.towers import StarterImageTower, ZeroShotImageTower, split_classifier


def _classifier(classes: int = 6) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


def test_starter_tower_without_top_k_is_the_zero_shot_tower() -> None:
    clf = _classifier()
    embeds = torch.randn(6, 16)
    x = torch.randn(4, 3, 16, 16)
    new = StarterImageTower(clf, embeds, 2.0, top_k=None).eval()
    old = ZeroShotImageTower(clf, embeds, 2.0).eval()
    with torch.no_grad():
        joint, sim = new(x)
        assert torch.allclose(joint, old(x), atol=1e-6)
        pooled = clf[:-1](x)
    assert torch.allclose(sim, F.normalize(pooled, dim=-1), atol=1e-6)
    assert sim.shape == (4, 8)


def test_top_k_keeps_only_the_k_most_likely_classes() -> None:
    clf = _classifier()
    embeds = torch.eye(6)  # one axis per class: the joint vector shows the class weights
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        logits = clf(x)
        joint, _ = StarterImageTower(clf, embeds, 3.0, top_k=2).eval()(x)
    for row, lg in zip(joint, logits):
        top = set(torch.topk(lg, 2).indices.tolist())
        assert {i for i in range(6) if row[i] > 0} == top
        p = (lg[list(sorted(top))] / 3.0).softmax(-1)
        assert torch.allclose(row[sorted(top)], F.normalize(p, dim=-1), atol=1e-5)
    with torch.no_grad():  # k at or above the number of classes: every class
        full, _ = StarterImageTower(clf, embeds, 3.0, top_k=50).eval()(x)
        none, _ = StarterImageTower(clf, embeds, 3.0, top_k=None).eval()(x)
    assert torch.allclose(full, none, atol=1e-6)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        StarterImageTower(clf, embeds, 3.0, top_k=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        StarterImageTower(clf, embeds, 0.0)


def test_split_classifier_refuses_what_it_cannot_split() -> None:
    feats, head = split_classifier(_classifier())
    assert isinstance(head, nn.Linear)
    with pytest.raises(TypeError, match="cannot split Conv2d"):
        split_classifier(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="cannot split Sequential"):
        split_classifier(nn.Sequential(nn.Flatten(), nn.ReLU()))


def test_split_classifier_on_efficientnet_matches_its_logits() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    feats, head = split_classifier(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = feats(x)
        assert pooled.shape == (2, 1280)
        assert torch.allclose(head(pooled), net(x), atol=1e-4)


def test_ranks_count_ties_against_the_target_and_recall() -> None:
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # row 2 ties row 0 after normalisation
    r = Q.ranks_of_targets(q, g, [0, 1, 1])
    assert r.tolist() == [1, 0, 2]  # the last query scores all three rows equally
    assert Q.recall_at(r, 1) == pytest.approx(1 / 3) and Q.recall_at(r, 2) == pytest.approx(2 / 3)


def test_most_similar_excludes_the_query_itself() -> None:
    v = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    top = Q.most_similar(v, ["a", "b", "c", "d"], "a", 2)
    assert [n for n, _ in top] == ["b", "d"]


def test_query_sets_are_disjoint_and_cover_the_same_photos() -> None:
    sets = Q.load_query_sets()
    assert set(sets["tuning"]) == set(sets["held-out"])
    tuning = {q.lower() for qs in sets["tuning"].values() for q in qs}
    held = [q.lower() for qs in sets["held-out"].values() for q in qs]
    assert len(held) >= 40 and not tuning & set(held)
    texts, targets = Q.flatten(sets["held-out"], sorted(sets["held-out"]))
    assert len(texts) == len(targets) == len(held)
    with pytest.raises(FileNotFoundError, match="not among the sample photos"):
        Q.flatten(sets["held-out"], ["chelsea.png"])


def test_augmentations_are_deterministic_and_change_the_pixels() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    for name, f in Q.AUGMENTATIONS:
        a, b = f(img), f(img)
        assert np.array_equal(np.asarray(a), np.asarray(b)), name
        assert a.mode == "RGB" and min(a.size) >= 30, name
        same_size = a.size == img.size
        assert not (same_size and np.array_equal(np.asarray(a), np.asarray(img))), name


def test_joint_head_mirrors_the_torch_tower() -> None:
    clf = _classifier()
    embeds = torch.randn(6, 16)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        logits = clf(x).numpy()
        joint, _ = StarterImageTower(clf, embeds, 3.0, top_k=3).eval()(x)
    got = Q.joint_head(logits, F.normalize(embeds, dim=-1).numpy(), 3.0, 3)
    assert np.allclose(got, joint.numpy(), atol=1e-5)


def test_write_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    path = tmp_path / "starter.md"
    path.write_text("# Starter\n\nother tables\n")
    Q.write_section("## first\n", path)
    Q.write_section("## second\n", path)
    text = path.read_text()
    assert text.startswith("# Starter\n\nother tables\n")
    assert "## second" in text and "## first" not in text
    assert text.count(Q.BEGIN) == 1 and text.count(Q.END) == 1


def test_heldout_file_is_untouched_json() -> None:
    data = json.loads(Q.HELDOUT.read_text(encoding="utf-8"))
    assert all(len(v) == 4 for v in data["queries"].values())


def test_cost_cells_give_each_cost_and_its_ratio_to_the_base():
    base = {"size_mb": 100.0, "text_qps": 200.0, "images_per_s": 10.0}
    slower = {"size_mb": 120.0, "text_qps": 100.0, "images_per_s": 8.0}
    # sizes as a ratio of the base's; speeds as latency ratios (base rate / this rate)
    assert Q.cost_cells(slower, base) == ["120.0 (1.20x)", "100 (2.00x)", "8.0 (1.25x)"]
    assert Q.cost_cells(base, base) == ["100.0 (1.00x)", "200 (1.00x)", "10.0 (1.00x)"]
