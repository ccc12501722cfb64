"""Offline weights (issue 30): ``training.weights fetch`` fills one folder with a manifest and
checksums; with LEANCLIP_WEIGHTS every builder loads from it and never touches the network; a
missing weight is an error naming it. Fake weights: tiny random models in the stored formats."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._fixtures_weights import make_fake_weights
from training import weights
from training.models import build_hf_student, build_student, build_teacher

SHIPPED = {
    "open_clip:ViT-B-32:openai",
    "timm:vit_small_patch16_224.augreg_in21k",
    "timm:vit_small_patch32_224.augreg_in21k",
    "hf:huawei-noah/TinyBERT_General_4L_312D",
}


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_the_shipped_configs_name_every_paper_weight() -> None:
    assert set(weights.shipped_ids()) == SHIPPED


def test_fetch_writes_a_manifest_with_checksums_and_verify_finds_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "w"
    manifest = make_fake_weights(folder, monkeypatch)
    assert set(manifest["weights"]) == SHIPPED
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    hf = manifest["weights"]["hf:huawei-noah/TinyBERT_General_4L_312D"]
    assert (folder / hf["path"]).is_dir() and any(f.endswith("config.json") for f in hf["files"])
    for entry in manifest["weights"].values():
        for rel, meta in entry["files"].items():
            assert (folder / rel).stat().st_size == meta["bytes"] and len(meta["sha256"]) == 64
    assert weights.verify(folder, sorted(SHIPPED)) == []
    assert weights.main(["verify", str(folder)]) == 0
    # a second fetch keeps what is intact (the fetchers would fail if called)
    monkeypatch.setattr(weights, "FETCHERS", {k: None for k in weights.KINDS})
    assert weights.fetch(sorted(SHIPPED), folder, progress=lambda _: None) == manifest
    # damage: a changed byte and a deleted file are both reported, by name
    timm_file = folder / manifest["weights"]["timm:vit_small_patch16_224.augreg_in21k"]["path"]
    data = bytearray(timm_file.read_bytes())
    data[-1] ^= 0xFF
    timm_file.write_bytes(bytes(data))
    (folder / next(iter(hf["files"]))).unlink()
    problems = weights.verify(folder)
    assert len(problems) == 2
    assert any("vit_small_patch16_224" in p and "sha256" in p for p in problems)
    assert any("TinyBERT" in p and "missing" in p for p in problems)
    assert weights.main(["verify", str(folder)]) == 1


def test_builders_load_from_the_folder_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    folder = tmp_path / "w"
    manifest = make_fake_weights(folder, monkeypatch)
    monkeypatch.setenv(weights.ENV, str(folder))
    saved = torch.load(folder / manifest["weights"]["open_clip:ViT-B-32:openai"]["path"])
    teacher = build_teacher("ViT-B-32", "openai", tiny=True)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in saved.items())
    assert teacher.leanclip_config["open_clip_cfg"]["quick_gelu"]  # the OpenAI weights' activation

    saved = torch.load(folder / manifest["weights"]["timm:vit_small_patch16_224.augreg_in21k"]["path"])
    student = build_student("vit_small_patch16_224", 2, teacher, image_pretrained="augreg_in21k", tiny=True)
    got = student.visual.state_dict()
    assert torch.equal(got["patch_embed.proj.weight"], saved["patch_embed.proj.weight"])
    assert torch.equal(got["blocks.1.mlp.fc2.weight"], saved["blocks.1.mlp.fc2.weight"])

    hf = build_hf_student(
        "vit_small_patch32_224", "huawei-noah/TinyBERT_General_4L_312D", teacher, image_pretrained=None
    )
    assert hf.leanclip_config["text"]["name"] == "huawei-noah/TinyBERT_General_4L_312D"
    assert hf.leanclip_config["text"]["width"] == 32  # the fake folder's tiny BERT
    assert hf.tokenize(["a red photo"]).shape[0] == 1


def test_a_missing_weight_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    folder = tmp_path / "w"
    make_fake_weights(folder, monkeypatch, ids=["open_clip:ViT-B-32:openai"])
    monkeypatch.setenv(weights.ENV, str(folder))
    teacher = build_teacher("ViT-B-32", "openai", tiny=True)
    with pytest.raises(weights.WeightsError, match=r"timm:vit_small_patch16_224\.augreg_in21k.*fetch"):
        build_student("vit_small_patch16_224", 2, teacher, image_pretrained="augreg_in21k", tiny=True)
    with pytest.raises(weights.WeightsError, match="TinyBERT_General_4L_312D"):
        build_hf_student("vit_small_patch32_224", "huawei-noah/TinyBERT_General_4L_312D", teacher)
    with pytest.raises(weights.WeightsError, match="no manifest.json"):
        weights.use_weights_dir(tmp_path / "empty")
    monkeypatch.setenv(weights.ENV, str(tmp_path / "empty"))
    with pytest.raises(weights.WeightsError, match="no manifest.json"):
        build_teacher("ViT-B-32", "openai", tiny=True)


def test_a_config_key_sets_the_folder_for_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "w"
    make_fake_weights(folder, monkeypatch, ids=["open_clip:ViT-B-32:openai"])
    monkeypatch.delenv(weights.ENV, raising=False)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    weights.configure({"weights_dir": str(folder)})
    import os

    assert os.environ[weights.ENV] == str(folder.resolve()) and os.environ["HF_HUB_OFFLINE"] == "1"
    assert weights.local_weight("open_clip", "ViT-B-32:openai") == folder / "open_clip/ViT-B-32_openai.pt"
