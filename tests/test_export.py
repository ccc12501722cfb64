"""leanclip.export (and the training.export command line): ONNX export round trips (teacher- and student-shaped), self-check, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from leanclip.bundle import ImageSpec, TextSpec, read_manifest
from leanclip.encoder import Encoder
from leanclip.export import BundleTarget, ExportError, export_bundle, export_model
from leanclip.quantize import quantize_bundle
from leanclip.towers import FixedLengthTextTower, ImageTower
from tests._fixtures_bundle import make_tiny_bundle, make_tiny_clip, tiny_bundle  # noqa: F401
from training.export import main


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_manifest_and_onnx_signatures(tiny_bundle: Path):
    m = read_manifest(tiny_bundle)
    assert m.embedding_dim == 32 and m.precision == "fp32"
    assert m.image.size == 32 and m.text.context_length == 77 and m.text.kind == "clip"
    assert set(m.files) == {"image.onnx", "text.onnx", "tokenizer.json"}
    assert m.extra["self_check"]["fp32 image encoder"] >= 0.999
    assert m.extra["self_check"]["fp32 text encoder"] >= 0.999
    assert m.extra["text_dynamic_length"] is True
    for name, inp, out in (
        ("image.onnx", "pixel_values", "image_embeds"),
        ("text.onnx", "input_ids", "text_embeds"),
    ):
        model = onnx.load(str(tiny_bundle / name))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        (i,) = model.graph.input
        assert i.name == inp and model.graph.output[0].name == out
        dims = i.type.tensor_type.shape.dim
        assert dims[0].dim_param, f"{name}: batch axis is not dynamic"
        if name == "text.onnx":
            assert dims[1].dim_param, "text sequence axis is not dynamic"


def test_text_onnx_runs_at_any_length_and_padding_is_exact(tiny_bundle: Path):
    """Short inputs run short; padding after <end_of_text> does not change the embedding."""
    model = make_tiny_clip()
    sess = ort.InferenceSession(str(tiny_bundle / "text.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n, length in ((1, 2), (3, 9), (2, 77)):
        ids = rng.integers(1, 49000, size=(n, length))
        ids[:, 0], ids[:, -1] = 49406, 49407
        got = sess.run(None, {"input_ids": ids})[0]
        full = np.zeros((n, 77), dtype=np.int64)
        full[:, :length] = ids
        with torch.no_grad():
            ref = model.encode_text(torch.from_numpy(full)).numpy()
        assert _cos(got, ref).min() > 0.9999, (n, length)


def test_student_shaped_model_round_trip(tmp_path: Path):
    models = pytest.importorskip("training.models")
    torch.manual_seed(0)
    student = models.build_student("vit_small_patch16_224", text_layers=2, tiny=True).eval()
    out = export_model(student, tmp_path / "student", name="tiny-student", source="test")
    enc = Encoder(out)
    m = enc.manifest
    assert m.image.size == student.image_size
    assert m.image.mean == pytest.approx(list(student.image_mean))
    texts = ["a dog on a skateboard", "", "x " * 100]
    with torch.no_grad():
        ref_t = student.encode_text(models.tokenize(texts)).numpy()
    assert _cos(enc.encode_text(texts), ref_t).min() > 0.999
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    px = torch.from_numpy(enc.preprocess(img))[None]
    with torch.no_grad():
        ref_i = student.encode_image(px).numpy()
    assert _cos(enc.encode_images([img]), ref_i).min() > 0.999


class _Mismatch(nn.Module):
    """Exports a different function than it runs eagerly: the self-check must catch it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.encode_image(pixel_values)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            out = out.flip(-1)
        return out


def test_self_check_failure_is_clear_and_leaves_nothing(tmp_path: Path):
    model = make_tiny_clip()
    out = tmp_path / "bad"
    with pytest.raises(ExportError, match=r"self-check failed.*fp32 image encoder: min cosine"):
        export_bundle(
            out,
            BundleTarget(
                image_tower=_Mismatch(model),
                text_tower=FixedLengthTextTower(model),
                image=ImageSpec(size=32),
                text=TextSpec(),
                name="bad",
            ),
        )
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")], "temporary files left behind"


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path):
    model = make_tiny_clip()
    target = tmp_path / "photos"
    target.mkdir()
    (target / "keep.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a leanclip bundle"):
        export_model(model, target)
    assert (target / "keep.jpg").exists()


class _WordPieceTower(nn.Module):
    """A BERT-shaped stand-in: embeddings + one encoder layer + masked mean pooling."""

    def __init__(self, vocab: int, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True, dropout=0.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.layer(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).float()
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "dog", "cat", "photo", "of", "the", "##s", "on", "mat"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok, len(words)


class _SmallImage(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(pixel_values).relu().mean((2, 3)))


def test_wordpiece_towers_with_attention_mask(tmp_path: Path):
    torch.manual_seed(0)
    tok, vocab = _wordpiece_tokenizer()
    text_tower, image_tower = _WordPieceTower(vocab).eval(), _SmallImage().eval()
    spec = TextSpec(kind="wordpiece", inputs=["input_ids", "attention_mask"], pad_id=0, context_length=16)
    out = export_bundle(
        tmp_path / "wp",
        BundleTarget(
            image_tower=image_tower,
            text_tower=text_tower,
            tokenizer_json=tok,
            image=ImageSpec(size=24, mean=[0.5] * 3, std=[0.25] * 3),
            text=spec,
            embedding_dim=16,
            name="wp",
            source="test",
            example_texts=["a dog", "the cats on the mat", ""],
        ),
    )
    enc = Encoder(out)
    assert enc.manifest.text.inputs == ["input_ids", "attention_mask"]
    texts = ["a photo of a dog", "cats", "the dog on the mat " * 10]
    got = enc.encode_text(texts)
    ids = enc.tokenize(texts)
    assert ids[1] == [2, 6, 10, 3] and len(ids[2]) == 16 and ids[2][-1] == 3  # truncated, [SEP] kept
    refs = []
    for row in ids:  # each text alone, unpadded: padding must not matter
        t = torch.tensor([row])
        with torch.no_grad():
            refs.append(text_tower(t, torch.ones_like(t)).numpy()[0])
    assert _cos(got, np.stack(refs)).min() > 0.999
    assert enc.manifest.image.mean == [0.5] * 3


def test_fixed_length_text_tower(tmp_path: Path):
    """A text tower without CLIP's attributes is exported at the full context; the Encoder pads."""
    model = make_tiny_clip(seed=3)
    out = export_bundle(
        tmp_path / "fixed",
        BundleTarget(
            image_tower=ImageTower(model),
            text_tower=FixedLengthTextTower(model),
            image=ImageSpec(size=32),
            text=TextSpec(),
            name="fixed",
        ),
    )
    m = read_manifest(out)
    assert m.extra["text_dynamic_length"] is False
    sess = ort.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1] == 77
    enc = Encoder(out)
    import open_clip

    texts = ["a dog", "two cats on a mat"]
    with torch.no_grad():
        ref = model.encode_text(open_clip.tokenize(texts)).numpy()
    assert _cos(enc.encode_text(texts), ref).min() > 0.999


def test_quantize_bundle_and_cli_with_checkpoint(tmp_path: Path, tiny_bundle: Path):
    q = quantize_bundle(tiny_bundle, tmp_path / "q8")
    m = read_manifest(q)
    assert m.precision == "int8" and m.extra["self_check_int8_vs_fp32"]["int8 text encoder"] >= 0.99
    assert Encoder(q).encode_text(["a dog"]).shape == (1, 32)
    # op types are a choice per tower (MiniLM-style towers keep fp32 MatMuls)
    g = quantize_bundle(tiny_bundle, tmp_path / "gather-only", text_op_types=["Gather"])
    assert read_manifest(g).extra["quantization"]["op_types"]["text.onnx"] == ["Gather"]
    assert (
        (q / "text.onnx").stat().st_size
        < (g / "text.onnx").stat().st_size
        < (tiny_bundle / "text.onnx").stat().st_size
    )

    models = pytest.importorskip("training.models")
    teacher = models.build_teacher("ViT-B-32", pretrained=None, tiny=True)
    ckpt = tmp_path / "teacher.pt"
    models.save_checkpoint(ckpt, teacher)
    out = tmp_path / "cli"
    assert main([str(ckpt), str(out), "--int8"]) == 0
    m32, m8 = read_manifest(out), read_manifest(Path(str(out) + "-int8"))
    assert (m32.precision, m8.precision) == ("fp32", "int8")
    assert "leanclip teacher checkpoint" in m32.source
    with torch.no_grad():
        ref = teacher.encode_text(models.tokenize(["a red car"])).numpy()
    assert _cos(Encoder(out).encode_text(["a red car"]), ref).min() > 0.999
    # errors are reported, not raised, by the command line
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 1
    assert main(["NoSuchModel-123", str(tmp_path / "y")]) == 1


def test_cli_help_runs():
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
