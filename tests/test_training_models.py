"""Teacher / student construction, layer selection, copying from the teacher, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import tests._fixtures_training  # noqa: F401  (sets torch threads)
from training import models
from training.models import (
    CheckpointError,
    build_student,
    build_teacher,
    load_model,
    save_checkpoint,
    select_text_layers,
    student_with_teacher_text,
    tokenize,
)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_teacher(pretrained=None, tiny=True).eval()


TEXTS = ["a red square picture", "two dogs on the grass", "x"]


def test_interface_attributes_and_shapes(teacher: torch.nn.Module) -> None:
    student = build_student(teacher=teacher, tiny=True, text_layers=2).eval()
    for model in (teacher, student):
        assert model.context_length == 77
        assert len(model.image_mean) == 3 and len(model.image_std) == 3
        pixels = torch.randn(2, 3, model.image_size, model.image_size)
        assert model.encode_image(pixels).shape == (2, models.TINY_EMBED_DIM)
        assert model.encode_text(tokenize(TEXTS)).shape == (3, models.TINY_EMBED_DIM)
    assert student.image_mean == (0.5, 0.5, 0.5)  # timm's ViT normalisation, not CLIP's


def test_select_text_layers() -> None:
    assert select_text_layers(12, 6) == [0, 1, 2, 3, 4, 5]
    assert select_text_layers(12, 4, "even") == [0, 4, 7, 11]
    assert select_text_layers(12, [0, 5, 11]) == [0, 5, 11]
    for bad in (0, 13, [3, 3], [12]):
        with pytest.raises(ValueError):
            select_text_layers(12, bad)


def test_student_with_all_layers_reproduces_teacher_text(teacher: torch.nn.Module) -> None:
    tokens = tokenize(TEXTS)
    full = build_student(teacher=teacher, tiny=True, text_layers=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(full.encode_text(tokens), teacher.encode_text(tokens))
        # shorter (ONNX-style) sequences give the same embedding: causal mask, EOT pooling
        torch.testing.assert_close(
            full.encode_text(tokens[:, :12]), teacher.encode_text(tokens), atol=1e-5, rtol=1e-5
        )
    truncated = build_student(teacher=teacher, tiny=True, text_layers=2).eval()
    with torch.no_grad():
        assert not torch.allclose(truncated.encode_text(tokens), teacher.encode_text(tokens))


def test_chosen_layers_are_copied(teacher: torch.nn.Module) -> None:
    student = build_student(teacher=teacher, tiny=True, text_layers=[1, 3])
    for dst, src in zip(student.text.transformer.resblocks, [1, 3]):
        for (name, a), (_, b) in zip(
            dst.state_dict().items(), teacher.transformer.resblocks[src].state_dict().items()
        ):
            assert torch.equal(a, b), name
    assert student.leanclip_config["text"]["layers"] == [1, 3]


def test_checkpoint_round_trip(tmp_path: Path, teacher: torch.nn.Module) -> None:
    student = build_student(teacher=teacher, tiny=True, text_layers=2).eval()
    pixels = torch.rand(2, 3, student.image_size, student.image_size)
    tokens = tokenize(TEXTS)
    for model, name in ((student, "s.pt"), (teacher, "t.pt")):
        save_checkpoint(tmp_path / name, model, {"note": 1})
        loaded = load_model(tmp_path / name)
        assert type(loaded) is type(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))
            torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens))
        assert loaded.image_size == model.image_size
    # a leanclip teacher checkpoint is accepted where a teacher is expected (T')
    again = build_teacher(pretrained=str(tmp_path / "t.pt"))
    torch.testing.assert_close(again.logit_scale, teacher.logit_scale)
    with pytest.raises(ValueError, match="student"):
        build_teacher(pretrained=str(tmp_path / "s.pt"))


def test_bad_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a leanclip"):
        load_model(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_teacher(pretrained="/nowhere/teacher.pt", tiny=True)


def test_open_clip_checkpoint_file_as_teacher(tmp_path: Path, teacher: torch.nn.Module) -> None:
    torch.save(teacher.state_dict(), tmp_path / "openclip.pt")  # a plain open_clip state dict
    loaded = build_teacher(pretrained=str(tmp_path / "openclip.pt"), tiny=True)
    torch.testing.assert_close(loaded.text_projection, teacher.text_projection)


def test_image_backbone_from_local_weights(tmp_path: Path, teacher: torch.nn.Module) -> None:
    backbone = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, **models.TINY_STUDENT_TIMM
    )
    torch.save(backbone.state_dict(), tmp_path / "vit.pth")
    student = build_student(
        teacher=teacher, tiny=True, text_layers=2, image_pretrained=str(tmp_path / "vit.pth")
    )
    torch.testing.assert_close(student.visual.pos_embed, backbone.pos_embed)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_student(
            teacher=teacher, tiny=True, text_layers=2, image_pretrained=str(tmp_path / "missing.pth")
        )


def test_cpu_fast_preset_builds(teacher: torch.nn.Module) -> None:
    student = build_student("vit_small_patch32_224", teacher=teacher, tiny=True, text_layers=2)
    assert student.leanclip_config["image"]["backbone"] == "vit_small_patch32_224"
    out = student.encode_image(torch.rand(1, 3, student.image_size, student.image_size))
    assert out.shape == (1, models.TINY_EMBED_DIM)


def test_image_only_ablation_student_uses_teacher_text(teacher: torch.nn.Module, tmp_path: Path) -> None:
    student = build_student(teacher=teacher, tiny=True, text_layers=2)
    combined = student_with_teacher_text(student, teacher).eval()
    tokens = tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(combined.encode_text(tokens), teacher.encode_text(tokens))
    assert combined.visual is student.visual
    save_checkpoint(tmp_path / "c.pt", combined)
    assert load_model(tmp_path / "c.pt").leanclip_config["text"]["layers"] == [0, 1, 2, 3]
