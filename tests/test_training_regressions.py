"""Defects a review of training/ found (issue 17), each pinned by a test that failed on the old
code: best.pt across the phases of sequential fine-tuning, the T' cache keyed by the teacher's
weights (not its path), the Table 2 runner resuming an interrupted stage 1, an epoch visiting
every caption, and the paper's TinyBERT baseline (student towers against each other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests._fixtures_training import make_karpathy, require_engine, tiny_stage1_config, tiny_stage2_config

require_engine()

from training import ablations, stage1, stage2  # noqa: E402
from training.models import build_teacher, read_checkpoint, save_checkpoint, tower_parameters  # noqa: E402
from training.train_utils import seed_everything  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("regressions")
    json_path, image_root = make_karpathy(root, n_train=24, n_val=4, n_test=4)
    return root, json_path, image_root


def test_best_checkpoint_is_the_best_over_all_phases(
    dataset: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Teacher fine-tuning whose text phase never beats the image phase: best.pt must stay the
    image phase's best (the old code reset the best per phase and overwrote best.pt)."""
    scripted = iter([50.0, 60.0, 40.0, 45.0])  # image epochs 0, 1; text epochs 0, 1
    monkeypatch.setattr(stage2.Stage2Trainer, "evaluate", lambda self, phase: {"mean_recall": next(scripted)})
    config = tiny_stage2_config(
        *dataset, "best_over_phases", {"kind": "teacher"}, None, kd=False, hn=False, epochs=2, batch_size=60
    )
    trainer = stage2.Stage2Trainer(config)
    state = trainer.run()
    assert [h["phase"] for h in state.history] == ["image"] * 4 + ["text"] * 4  # 120 captions / 60
    best = read_checkpoint(trainer.run_dir / "best.pt")
    assert best["train_state"]["best_overall"] == 60.0
    assert best["train_state"]["phase_index"] == 0
    phase0 = read_checkpoint(trainer.run_dir / "best_phase0.pt")["state_dict"]
    assert all(torch.equal(best["state_dict"][k], v) for k, v in phase0.items())
    assert state.best_overall == 60.0


def test_student_image_phase_validated_with_teacher_text_never_becomes_best(
    dataset: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A student's image phase is scored with T''s text tower, which its checkpoint does not
    hold: only evaluations of the saved towers compete for best.pt."""
    seed_everything(0)
    save_checkpoint(tmp_path / "t.pt", build_teacher(pretrained=None, tiny=True), {"stage": 2})
    scripted = iter([90.0, 10.0])
    monkeypatch.setattr(stage2.Stage2Trainer, "evaluate", lambda self, phase: {"mean_recall": next(scripted)})
    model = {"kind": "student", "image_backbone": "vit_small_patch16_224", "text_layers": 2}
    trainer = stage2.Stage2Trainer(
        tiny_stage2_config(*dataset, "student_best", model, str(tmp_path / "t.pt"), epochs=1, hn=False)
    )
    trainer.run()
    best = read_checkpoint(trainer.run_dir / "best.pt")
    assert best["train_state"]["phase_index"] == 1 and best["train_state"]["best_overall"] == 10


def test_teacher_cache_follows_the_weights_not_the_path(
    dataset: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """T' retrained to the same path: the cached embeddings of the old T' must not be reused."""
    teacher_path = tmp_path / "teacher_sf" / "best.pt"
    model = {"kind": "student", "image_backbone": "vit_small_patch16_224", "text_layers": 2}
    config = tiny_stage2_config(*dataset, "cache_hash", model, str(teacher_path))

    def cached_embeddings(seed: int) -> tuple[np.ndarray, np.ndarray]:
        seed_everything(seed)
        save_checkpoint(teacher_path, build_teacher(pretrained=None, tiny=True), {"stage": 2})
        trainer = stage2.Stage2Trainer(config)
        trainer.prepare_teacher_cache()
        fresh = trainer._encode_images(trainer.teacher)[0]
        return trainer.teacher_images, fresh

    first, _ = cached_embeddings(1)
    second, fresh = cached_embeddings(2)  # same path, new weights, same run_dir
    assert not np.allclose(first, second)
    assert np.array_equal(second, fresh)
    assert len(list((Path(config["run_dir"]) / "cache").glob("teacher_images_*.npz"))) == 2


def test_table2_runner_resumes_an_interrupted_stage1(
    dataset: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root, json_path, image_root = dataset
    calls: list[tuple[str, Any]] = []

    class Recorder:
        def __init__(self, config: dict[str, Any], info: Any = None) -> None:
            self.run_dir = Path(config["run_dir"])

        def run(self, resume: Any = None) -> None:
            calls.append((self.run_dir.name, resume))

    monkeypatch.setattr(stage1, "Stage1Trainer", Recorder)
    monkeypatch.setattr(stage2, "Stage2Trainer", Recorder)
    import yaml

    s1 = tiny_stage1_config(root, json_path, image_root)
    (tmp_path / "s1.yaml").write_text(yaml.safe_dump(s1))
    (tmp_path / "s2.yaml").write_text(yaml.safe_dump({"run_dir": "unused"}))
    out = tmp_path / "table2"
    (out / "stage1_infonce").mkdir(parents=True)
    (out / "stage1_infonce" / "latest.pt").write_bytes(b"interrupted run")
    table = {
        "out_dir": str(out),
        "default_stage1": "s1.yaml",
        "default_stage2": "s2.yaml",
        "test": {
            "format": "karpathy",
            "path": str(json_path),
            "image_root": str(image_root),
            "split": "test",
        },
        "rows": [{"label": "f_v^S", "name": "full", "stage1_loss": "infonce"}],
    }
    results = ablations.run_table(table, tmp_path)
    assert calls == [("stage1_infonce", out / "stage1_infonce" / "latest.pt"), ("full", None)]
    assert results == [("f_v^S", None)]


def test_stage2_epoch_visits_every_caption(dataset: tuple[Path, Path, Path]) -> None:
    """COCO has five captions per image: an epoch is 5x the images (the old epoch drew one
    caption per image, 1,180 steps on COCO where the paper's warm-up alone is 10,000)."""
    config = tiny_stage2_config(
        *dataset, "epoch", {"kind": "teacher"}, None, kd=False, hn=False, epochs=1, batch_size=8
    )
    trainer = stage2.Stage2Trainer(config)
    assert trainer.steps_per_epoch() == 120 // 8
    plan = trainer.epoch_plan(0, "image", 0, None)
    assert sorted(plan["pairs"][:, 1].tolist()) == list(range(120))


def test_tinybert_baseline_trains_student_towers_against_each_other(dataset: tuple[Path, Path, Path]) -> None:
    """The paper's baseline: stage-1 CLIP InfoNCE between the student's own two towers (and its
    logit scale); the teacher's towers play no part in the loss."""
    root, json_path, image_root = dataset
    config = tiny_stage1_config(
        root, json_path, image_root, loss="clip", epochs=1, max_steps=2, batch_size=8, cache_teacher=False
    )
    config["run_dir"] = str(root / "tinybert_clip")
    trainer = stage1.Stage1Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    trainer.teacher.encode_image = trainer.teacher.encode_text = None  # must not be called
    history = trainer.run()
    assert len(history) == 2 and "clip" in history[0] and np.isfinite(history[-1]["loss"])
    after = dict(trainer.student.named_parameters())
    for side in ("image", "text"):
        assert any(not torch.equal(before[n], after[n]) for n in tower_parameters(trainer.student, side)), (
            side
        )
    assert not torch.equal(before["logit_scale"], after["logit_scale"])


def test_stage1_trains_only_its_modalities(dataset: tuple[Path, Path, Path]) -> None:
    """Stage 1 never trains the logit scale, and an image-only run leaves the text tower alone
    (what DDP would otherwise wait for)."""
    root, json_path, image_root = dataset
    config = tiny_stage1_config(
        root, json_path, image_root, epochs=1, max_steps=2, batch_size=8, modalities=["image"]
    )
    config["run_dir"] = str(root / "image_only")
    trainer = stage1.Stage1Trainer(config)
    trainable = {n for n, p in trainer.student.named_parameters() if p.requires_grad}
    assert trainable == set(tower_parameters(trainer.student, "image"))


def test_clip_stage1_computes_no_teacher_cache(dataset: tuple[Path, Path, Path]) -> None:
    """The paired ``clip`` loss (TinyBERT baseline) never uses the teacher's embeddings, so even
    with ``cache_teacher`` on it must not spend a pass over the data computing them (issue 26)."""
    root, json_path, image_root = dataset
    config = tiny_stage1_config(
        root, json_path, image_root, loss="clip", epochs=1, max_steps=1, batch_size=8, cache_teacher=True
    )
    config["run_dir"] = str(root / "clip_cached")
    trainer = stage1.Stage1Trainer(config)
    trainer.teacher.encode_image = trainer.teacher.encode_text = None  # a cache pass would call these
    assert len(trainer.run()) == 1
    assert trainer.teacher_image_cache is None and trainer.teacher_text_cache is None
    assert not list((root / "clip_cached" / "cache").glob("teacher_*"))


@pytest.mark.parametrize("table", ["table1", "table2"])
def test_table_runners_print_and_write_on_rank_zero_only(
    table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under torchrun every rank runs ``training.ablations``; only rank 0 may print the table and
    write the JSON (issue 26: every rank did)."""
    import yaml

    from training import distributed
    from training.distributed import DistInfo

    config = tmp_path / f"{table}.yaml"
    config.write_text(yaml.safe_dump({"steps": [], "evaluate": {}} if table == "table1" else {"rows": []}))
    recalls = {
        "t2i_R@1": 1.0,
        "t2i_R@5": 2.0,
        "t2i_R@10": 3.0,
        "i2t_R@1": 1.0,
        "i2t_R@5": 2.0,
        "i2t_R@10": 3.0,
    }
    monkeypatch.setattr(ablations, "run_steps_and_table1", lambda *a, **k: {"S": {"coco5k": recalls}})
    monkeypatch.setattr(ablations, "run_table", lambda *a, **k: [("S", recalls)])
    for rank in (1, 0):
        monkeypatch.setattr(
            distributed,
            "init_distributed",
            lambda device=None, r=rank: DistInfo(r, 2, r, torch.device("cpu")),
        )
        out = tmp_path / f"rank{rank}.json"
        assert ablations.main(["--config", str(config), "--json-out", str(out)]) == 0
        printed = capsys.readouterr().out
        if rank == 1:
            assert printed == "" and not out.exists()
        else:
            assert "S" in printed and json.loads(out.read_text())["S"]


def test_table1_runner_checks_every_input_before_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped Table 1 runner with no data: it names every missing input (the TinyBERT row's
    cc3m_local.tsv among them) before any step starts, instead of dying hours later (issue 26)."""
    config = Path(ablations.__file__).parent / "configs" / "table1.yaml"
    monkeypatch.chdir(tmp_path)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a step started although inputs are missing")

    monkeypatch.setattr(stage1, "Stage1Trainer", no_training)
    monkeypatch.setattr(stage2, "Stage2Trainer", no_training)
    with pytest.raises(FileNotFoundError) as err:
        ablations.main(["--config", str(config), "--set", "device=cpu"])
    message = str(err.value)
    assert "nothing was run" in message
    for needed in ("data/cc3m/cc3m_local.tsv (needed by tinybert_stage1.yaml)", "data/cc3m/shards.json",
                   "data/coco/dataset_coco.json", "data/flickr30k/flickr30k-images"):  # fmt: skip
        assert needed in message
