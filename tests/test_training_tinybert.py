"""Table 1's baseline "f_v^S + f_t^TinyBERT": a student with a Hugging Face BERT-style text tower
and its own WordPiece tokenizer, trained with inter-modal InfoNCE in stage 1 and plain joint
InfoNCE in stage 2. Tiny random BERT (built locally, nothing downloaded) + tiny image student on
the generated COCO-style dataset. Needs the built Rust engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests._fixtures_training import (  # noqa: E402
    evaluate_argv,
    make_karpathy,
    require_engine,
    run_table1_evaluation,
    tiny_stage1_config,
    tiny_stage2_config,
)

leanclip = require_engine()

from training import evaluate, stage1, stage2  # noqa: E402
from training.data import load_karpathy  # noqa: E402
from training.models import (  # noqa: E402
    HFTextTower,
    build_hf_student,
    build_teacher,
    has_own_tokenizer,
    load_model,
    save_checkpoint,
    tokenize,
    tokenize_for,
)
from training.train_utils import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
HF_MODEL = {"text_encoder": "tiny-bert", "text_pooling": "mean", "text_context_length": 32}


def _falls(values: list[float], window: int = 3) -> bool:
    return float(np.mean(values[-window:])) < float(np.mean(values[:window]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tinybert")
    json_path, image_root = make_karpathy(root, n_train=24, n_val=8, n_test=10)
    return root, json_path, image_root


@pytest.fixture(scope="module")
def stage1_run(dataset: tuple[Path, Path, Path]) -> tuple[stage1.Stage1Trainer, list[dict]]:
    root, json_path, image_root = dataset
    # the paper's baseline: the two student towers against each other (an epoch: 120 captions)
    config = tiny_stage1_config(root, json_path, image_root, loss="clip", epochs=5, batch_size=40)
    config["run_dir"] = str(root / "tinybert_stage1")
    config["model"].update(HF_MODEL)
    torch.manual_seed(0)
    trainer = stage1.Stage1Trainer(config)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def stage2_run(
    dataset: tuple[Path, Path, Path], stage1_run: Any
) -> tuple[stage2.Stage2Trainer, stage2.Stage2State]:
    root, json_path, image_root = dataset
    config = tiny_stage2_config(
        root,
        json_path,
        image_root,
        "tinybert_stage2",
        {"kind": "student", "init": str(root / "tinybert_stage1" / "final.pt")},
        None,
        phases=["joint"],
        kd=False,
        hn=False,
        epochs=2,
    )
    trainer = stage2.Stage2Trainer(config)
    return trainer, trainer.run()


def test_build_and_tokenize() -> None:
    teacher = build_teacher(pretrained=None, tiny=True)
    student = build_hf_student(teacher=teacher, tiny=True, pooling="cls", context_length=16)
    assert isinstance(student.text, HFTextTower) and has_own_tokenizer(student)
    assert not has_own_tokenizer(teacher)
    assert student.context_length == 16 and student.leanclip_config["text"]["kind"] == "hf"
    tokens = tokenize_for(student, ["A red square", "photo 12: blue with dots " * 10])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    tok = student.text.tokenizer
    cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert tokens[0, 0] == cls and tokens[1, 0] == cls and tokens[1, -1] == sep  # truncated
    assert tok.decode(tokens[0].tolist()) == "a red square"  # lower-cased WordPiece
    n = int((tokens[0] != pad).sum())
    assert tokens[0, n - 1] == sep and bool((tokens[0, n:] == pad).all())
    emb = student.eval().encode_text(tokens)
    assert emb.shape == (2, teacher.leanclip_config["open_clip_cfg"]["embed_dim"])
    # the CLIP student and the teacher still tokenize with open_clip's BPE
    assert torch.equal(tokenize_for(teacher, ["a cat"]), tokenize(["a cat"], 77))
    # mean pooling ignores padding: the same text padded further embeds the same
    mean = build_hf_student(teacher=teacher, tiny=True, pooling="mean", context_length=16).eval()
    padded = mean.tokenize(["a red"])
    n = int((padded != pad).sum())
    assert n < 16
    with torch.no_grad():
        assert torch.allclose(mean.encode_text(padded[:, :n]), mean.encode_text(padded), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        build_hf_student(teacher=teacher, tiny=True, pooling="max")
    from training.export import export_model  # CLIP's BPE would silently be wrong: refused

    with pytest.raises(ValueError, match="Hugging Face text tower"):
        export_model(student, Path("/nonexistent/never-written"))


def test_local_directory_and_checkpoint_round_trip(tmp_path: Path) -> None:
    """A BERT-style encoder from a local directory (the hub-free path of AutoModel/AutoTokenizer)
    round-trips through save_checkpoint/load_model, which rebuilds it from the stored config
    and tokenizer without the directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "blue",
        "square",
        "photo",
        "of",
        "dots",
        "##s",
    ]
    bert_dir = tmp_path / "bert"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(bert_dir)
    BertModel(
        BertConfig(
            vocab_size=len(words),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=24,
        )
    ).save_pretrained(bert_dir)
    teacher = build_teacher(pretrained=None, tiny=True)
    student = build_hf_student(
        "vit_tiny_patch16_224", str(bert_dir), teacher=teacher, tiny=False, context_length=77
    ).eval()
    assert student.context_length == 24  # capped at the encoder's position embeddings
    assert student.tokenize(["a red squares"])[0, :5].tolist() == [2, 5, 6, 8, 12]
    with pytest.raises(FileNotFoundError, match="text encoder directory"):
        build_hf_student(text_model=str(tmp_path / "missing"), teacher=teacher)
    save_checkpoint(tmp_path / "ck.pt", student)
    import shutil

    shutil.rmtree(bert_dir)  # the checkpoint alone rebuilds the tower and its tokenizer
    loaded = load_model(tmp_path / "ck.pt")
    texts = ["a photo of blue dots", "red square"]
    assert torch.equal(loaded.tokenize(texts), student.tokenize(texts))
    with torch.no_grad():
        assert torch.allclose(
            loaded.encode_text(loaded.tokenize(texts)),
            student.encode_text(student.tokenize(texts)),
            atol=1e-6,
        )


def test_stage1_student_towers_infonce_learns(stage1_run: Any) -> None:
    trainer, history = stage1_run
    assert len(history) == 5 * 3  # 120 captions // global batch 40, 5 epochs
    assert _falls([h["clip"] for h in history])
    assert all(np.isfinite(h["loss"]) for h in history)
    # the student tokenized with its WordPiece vocabulary, the teacher kept CLIP's BPE
    assert trainer.tokens.shape[1] == 32 and trainer.teacher_tokens.shape[1] == 77
    assert not torch.equal(trainer.tokens[:, :32], trainer.teacher_tokens[:, :32])
    final = load_model(trainer.run_dir / "final.pt")
    assert isinstance(final.text, HFTextTower) and final.text.pooling == "mean"


def test_stage2_joint_infonce_and_round_trip(stage2_run: Any, dataset: tuple[Path, Path, Path]) -> None:
    trainer, state = stage2_run
    assert trainer.teacher is None  # no KD, no HN: the baseline needs no teacher
    assert {h["phase"] for h in state.history} == {"joint"} and len(state.history) == 6
    for h in state.history:
        assert set(h) >= {"t2v", "v2t"} and not {"kd_kl", "hn"} & set(h)
        assert h["loss"] == pytest.approx(h["t2v"] + h["v2t"], rel=1e-5)
    assert _falls([h["loss"] for h in state.history])
    assert len(state.evals) == 2 and all(0 <= e["mean_recall"] <= 100 for e in state.evals)
    best = load_model(trainer.run_dir / "best.pt")
    assert isinstance(best.text, HFTextTower)
    texts = load_karpathy(dataset[1], dataset[2], "val").captions[:6]
    model = trainer.model.eval()
    with torch.no_grad():
        final = load_model(trainer.run_dir / "final.pt")
        assert torch.allclose(
            final.encode_text(final.tokenize(texts)), model.encode_text(tokenize_for(model, texts)), atol=1e-5
        )


def test_evaluation_and_table1_row(
    stage2_run: Any, dataset: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    root, json_path, image_root = dataset
    best = stage2_run[0].run_dir / "best.pt"
    out = root / "eval.json"
    assert evaluate.main(evaluate_argv(f"TB={best}", json_path, image_root, out)) == 0
    numbers = json.loads(out.read_text())["TB"]
    assert set(numbers) == {"coco5k", "coco1k"}
    assert all(0 <= v <= 100 for r in numbers.values() for v in r.values())
    capsys.readouterr()
    label = "f_v^S   f_t^TinyBERT"
    assert run_table1_evaluation(root, json_path, image_root, {label: {"coco": str(best)}}) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(label))
    assert f"{numbers['coco5k']['t2i_R@1']:.1f}" in row


def test_shipped_configs_describe_the_baseline() -> None:
    s1 = load_config(CONFIGS / "tinybert_stage1.yaml")
    # the paper: the student towers fine-tuned against each other with InfoNCE
    assert s1["train"]["loss"] == "clip" and "paired" in s1["data"]
    extra = load_config(CONFIGS / "tinybert_xmodal_stage1.yaml")
    assert extra["train"]["loss"] == "intermodal" and extra["run_dir"] != s1["run_dir"]
    assert s1["model"]["text_encoder"] == "huawei-noah/TinyBERT_General_4L_312D"
    assert s1["model"]["image_backbone"] == "vit_small_patch16_224"
    table1 = load_config(CONFIGS / "table1.yaml")
    steps = [s["config"] for s in table1["steps"]]
    for ds in ("coco", "flickr"):
        s2 = load_config(CONFIGS / f"tinybert_stage2_{ds}.yaml")
        assert s2["train"]["phases"] == ["joint"] and not s2["train"]["kd"]
        assert not s2["train"]["hn"] and s2["model"]["init"] == s1["run_dir"] + "/final.pt"
        assert f"tinybert_stage2_{ds}.yaml" in steps
        row = table1["evaluate"]["models"]["f_v^S   f_t^TinyBERT"][ds]
        assert row == s2["run_dir"] + "/best.pt"
    assert steps.index("tinybert_stage1.yaml") < steps.index("tinybert_stage2_coco.yaml")
    for ds in ("coco", "flickr"):
        s2 = load_config(CONFIGS / f"tinybert_xmodal_stage2_{ds}.yaml")
        assert s2["model"]["init"] == extra["run_dir"] + "/final.pt"
        row = table1["evaluate"]["models"]["f_v^S   f_t^TinyBERT (x-modal KD, extra)"][ds]
        assert row == s2["run_dir"] + "/best.pt"
