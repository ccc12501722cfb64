"""The seeded stage-1 grid (training.stage1_seeds, issue 30): a learned temperature, a run that
resumes from its checkpoint to the same weights, the results file as the record that lets the
grid be finished over several sessions, and the verdict sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import pytest
import torch

from leanclip.minilm import embed_texts, make_tokenizer, tiny_wordpiece_tokenizer_json, truncate_layers
from tests.test_starter_stage1 import WORDS, corpus_file, tiny_teacher
from training import minilm_stage1 as s1
from training import stage1_seeds

TEXTS: List[str] = [f"the {a} {b} of {c}" for a in WORDS[:6] for b in WORDS[6:10] for c in WORDS[10:12]]


def _train(steps: int = 6) -> dict[str, Any]:
    return {
        **s1.DEFAULTS["train"],
        "steps": steps,
        "batch_size": 16,
        "lr": 1e-3,
        "log_every": 100,
        "temperature": 0.07,
    }


def test_learned_temperature_trains_from_its_start() -> None:
    teacher = tiny_teacher()
    tok = make_tokenizer(tiny_wordpiece_tokenizer_json(WORDS), 32)
    targets = embed_texts(teacher, tok, TEXTS)
    history = s1.distill(
        truncate_layers(teacher, [0, 3]), tok, TEXTS, targets, "infonce", _train(20), 0, True
    )
    taus = [h["temperature"] for h in history]
    assert taus[0] == pytest.approx(0.07, rel=0.02) and taus[-1] != pytest.approx(0.07, rel=1e-3)
    with pytest.raises(ValueError, match="infonce"):
        s1.distill(truncate_layers(teacher, [0, 3]), tok, TEXTS, targets, "mse", _train(), 0, True)


def test_an_interrupted_run_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = tiny_teacher()
    tok = make_tokenizer(tiny_wordpiece_tokenizer_json(WORDS), 32)
    targets = embed_texts(teacher, tok, TEXTS)

    def run(checkpoint: Path | None) -> tuple[torch.nn.Module, list]:
        torch.manual_seed(5)
        student = truncate_layers(teacher, [0, 3])
        student.config.hidden_dropout_prob = 0.1  # dropout on: the RNG state must resume too
        history = s1.distill(student, tok, TEXTS, targets, "infonce", _train(7), 3, True, checkpoint, 2)
        return student, history

    reference, ref_history = run(None)
    ckpt = tmp_path / "ckpt.pt"
    calls = {"n": 0}
    original = s1.tokenize

    def dies_at_step_six(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint
        return original(*args)

    monkeypatch.setattr(s1, "tokenize", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt)
    assert ckpt.is_file()
    monkeypatch.setattr(s1, "tokenize", original)
    resumed, history = run(ckpt)
    assert not ckpt.exists()  # a finished run removes its checkpoint
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _config(tmp_path: Path) -> dict[str, Any]:
    return {
        "out_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "results_md": str(tmp_path / "results.md"),
        "threads": 1,
        "student_layers": 2,
        "captions": False,
        "seeds": [0, 1],
        "rows": [
            {"name": "mse", "loss": "mse"},
            {"name": "infonce tau 0.05", "loss": "infonce", "temperature": 0.05},
            {"name": "infonce learned", "loss": "infonce", "temperature": 0.07, "learn_temperature": True},
        ],
        "data": {"sources": ["files"], "files": [str(corpus_file(tmp_path))], "heldout_fraction": 0.2},
        "train": {"steps": 3, "batch_size": 16, "lr": 1e-3, "log_every": 100},
    }


def test_the_grid_is_recorded_run_by_run_and_finished_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = tiny_teacher()
    tok_json = tiny_wordpiece_tokenizer_json(WORDS)
    md = tmp_path / "results.md"
    md.write_text("# Stage 1 on real weights\n\nthe earlier table\n")
    runs = stage1_seeds.run_grid(_config(tmp_path), teacher, tok_json, max_runs=2)
    assert [(r["row"], r["seed"]) for r in runs] == [("mse", 0), ("infonce tau 0.05", 0)]
    text = md.read_text()
    assert "**2 done, 4 remaining**" in text and "4 of 6 runs remain" in text
    assert "the earlier table" in text and "No verdict yet" in text
    assert stage1_seeds.read_runs(md) == runs
    # a later session: only the 4 missing runs train, then the summary and verdict are complete
    trained = []
    original = s1.distill
    monkeypatch.setattr(s1, "distill", lambda *a, **k: trained.append(a[4]) or original(*a, **k))
    runs = stage1_seeds.run_grid(_config(tmp_path), teacher, tok_json)
    assert len(runs) == 6 and len(trained) == 4
    text = md.read_text()
    assert "**6 done, 0 remaining**" in text and "remain;" not in text
    assert "| mse | 2/2 |" in text and "±" in text
    assert "No verdict yet" not in text and "infonce learned" in text.split("**Verdict:**")[1]
    assert text.count(stage1_seeds.BEGIN) == 1 and "the earlier table" in text
    assert stage1_seeds.run_grid(_config(tmp_path), teacher, tok_json) == runs  # nothing left to do


def test_verdict_compares_the_difference_with_the_spread() -> None:
    cfg = stage1_seeds.resolve(
        {
            "out_dir": "x",
            "results_md": "x.md",
            "seeds": [0, 1, 2],
            "rows": [{"name": "mse", "loss": "mse"}, {"name": "nce", "loss": "infonce"}],
        }
    )

    def runs(values: dict[str, list[float]]) -> list[dict[str, Any]]:
        return [
            {"row": row, "seed": i, "agreement@10": v, "heldout_r1": v}
            for row, vs in values.items()
            for i, v in enumerate(vs)
        ]

    assert "nce beats mse on agreement@10 (+0.100" in stage1_seeds.verdict(
        cfg, runs({"mse": [0.5, 0.51, 0.49], "nce": [0.6, 0.61, 0.59]})
    )
    assert "is within the spread of mse" in stage1_seeds.verdict(
        cfg, runs({"mse": [0.5, 0.6, 0.4], "nce": [0.52, 0.62, 0.42]})
    )
    assert "loses to mse" in stage1_seeds.verdict(
        cfg, runs({"mse": [0.6, 0.61, 0.59], "nce": [0.5, 0.51, 0.49]})
    )
    assert stage1_seeds.verdict(cfg, runs({"mse": [0.5], "nce": [0.6]})).startswith("No verdict yet")


def test_the_corpus_is_frozen_and_runs_on_another_are_refused(tmp_path: Path) -> None:
    cfg = stage1_seeds.resolve({**_config(tmp_path), "corpus_file": str(tmp_path / "corpus.json.gz")})
    first = stage1_seeds.frozen_corpus(cfg)
    (tmp_path / "corpus.txt").write_text(
        "A completely different sentence about trees.\n" * 3
    )  # the sources change
    again = stage1_seeds.frozen_corpus(cfg)
    assert again.train == first.train and again.heldout == first.heldout
    md = tmp_path / "results.md"
    stage1_seeds.write_section(md, stage1_seeds.render(cfg, [{"row": "mse", "seed": 0, "corpus": "0123456789ab",
        "agreement@10": 0.5, "final_loss": 0.1, "train_s": 1.0, "finished": "x"}], {}))  # fmt: skip
    with pytest.raises(ValueError, match="another corpus"):
        stage1_seeds.run_grid({**_config(tmp_path), "corpus_file": str(tmp_path / "corpus.json.gz")}, tiny_teacher(),
                              tiny_wordpiece_tokenizer_json(WORDS))  # fmt: skip
