"""End to end on a tiny random teacher/student and a generated COCO-style dataset: stage 1, teacher
sequential fine-tuning, student sequential fine-tuning with KD and HN, exact resumption,
evaluation against brute force, hard-negative exclusion. Needs the built Rust engine."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests._fixtures_training import (
    evaluate_argv,
    make_karpathy,
    require_engine,
    run_table1_evaluation,
    tiny_stage1_config,
    tiny_stage2_config,
    write_shard,
)

leanclip = require_engine()  # no numpy stand-in: these tests exercise the real engine

from training import evaluate, stage1, stage2  # noqa: E402
from training.data import load_karpathy  # noqa: E402
from training.models import load_model, read_checkpoint  # noqa: E402
from training.train_utils import seed_everything  # noqa: E402


def _falls(values: list[float], window: int = 3) -> bool:
    return float(np.mean(values[-window:])) < float(np.mean(values[:window]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    json_path, image_root = make_karpathy(root, n_train=24, n_val=8, n_test=10)
    return root, json_path, image_root


@pytest.fixture(scope="module")
def stage1_run(dataset: tuple[Path, Path, Path]) -> tuple[stage1.Stage1Trainer, list[dict]]:
    root, json_path, image_root = dataset
    config = tiny_stage1_config(root, json_path, image_root, epochs=2)
    config["data"]["texts"] = {"format": "lines", "path": str(root / "texts.txt")}
    corpus = load_karpathy(json_path, image_root, "train")
    (root / "texts.txt").write_text("\n".join(corpus.captions[::3]))  # 40 unpaired texts
    torch.manual_seed(0)
    trainer = stage1.Stage1Trainer(config)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def teacher_sf(dataset: tuple[Path, Path, Path]) -> tuple[Path, stage2.Stage2State]:
    root, json_path, image_root = dataset
    config = tiny_stage2_config(
        root,
        json_path,
        image_root,
        "teacher_sf",
        {"kind": "teacher"},
        None,
        kd=False,
        hn=False,
        epochs=2,
        lr=5e-4,
    )
    state = stage2.Stage2Trainer(config).run()
    return root / "teacher_sf", state


def test_stage1_intra_modal_distillation_learns(stage1_run: Any) -> None:
    trainer, history = stage1_run
    assert len(history) == 2 * 5  # max(24 images, 40 texts) // batch 8 steps, 2 epochs
    for key in ("image", "text"):
        assert _falls([h[key] for h in history]), key
    # the teacher stays frozen and in eval mode; its embeddings were cached on disk
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert trainer.teacher_image_cache is not None and trainer.teacher_text_cache is not None
    final = load_model(trainer.run_dir / "final.pt")
    assert final.leanclip_config["kind"] == "student"


def test_stage1_ablation_losses_and_skip(dataset: tuple[Path, Path, Path], stage1_run: Any) -> None:
    root, json_path, image_root = dataset
    for loss in ("mse", "intermodal"):
        config = tiny_stage1_config(
            root, json_path, image_root, loss=loss, epochs=1, cache_teacher=False, max_steps=2
        )
        config["run_dir"] = str(root / f"stage1_{loss}")
        history = stage1.Stage1Trainer(config).run()
        assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    # gradient accumulation: two micro-batches of 4, each with its own negatives
    config = tiny_stage1_config(root, json_path, image_root, epochs=1, max_steps=2, max_rank_batch=4)
    config["run_dir"] = str(root / "stage1_accum")
    trainer = stage1.Stage1Trainer(config)
    before = trainer.student.image_projection.weight.detach().clone()
    history = trainer.run()
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert not torch.equal(before, trainer.student.image_projection.weight)
    config = tiny_stage1_config(root, json_path, image_root, loss="none")
    config["run_dir"] = str(root / "stage1_none")
    assert stage1.Stage1Trainer(config).run() == []
    assert (root / "stage1_none" / "final.pt").is_file()


def test_stage1_streams_webdataset_shards(dataset: tuple[Path, Path, Path]) -> None:
    root, json_path, image_root = dataset
    corpus = load_karpathy(json_path, image_root, "train")
    shards = root / "shards"
    shards.mkdir()
    for s in range(2):
        write_shard(
            shards / f"{s:03d}.tar",
            [
                (f"{i:04d}", corpus.images[i].read_bytes(), corpus.captions[5 * i])
                for i in range(12 * s, 12 * s + 12)
            ],
        )
    config = tiny_stage1_config(root, json_path, image_root, epochs=1, modalities=["image"], max_steps=4)
    config["run_dir"] = str(root / "stage1_wds")
    config["data"]["images"] = {
        "format": "webdataset",
        "num_samples": 24,
        "shards": str(shards / "{000..001}.tar"),
    }
    history = stage1.Stage1Trainer(config).run()
    assert len(history) == 3  # 24 samples // batch 8
    assert all(np.isfinite(h["image"]) for h in history) and "text" not in history[0]


def test_stage1_resume_gives_identical_next_losses(dataset: tuple[Path, Path, Path], stage1_run: Any) -> None:
    root, json_path, image_root = dataset
    config = tiny_stage1_config(
        root, json_path, image_root, epochs=2, checkpoint_every=3, keep_checkpoints=True
    )
    config["data"]["texts"] = {"format": "lines", "path": str(root / "texts.txt")}
    config["run_dir"] = str(root / "stage1_resume")
    torch.manual_seed(0)
    full = stage1.Stage1Trainer(config).run()
    resumed_trainer = stage1.Stage1Trainer(config)
    resumed = resumed_trainer.run(resume=root / "stage1_resume" / "step6.pt")
    assert [h["loss"] for h in resumed[6:]] == [h["loss"] for h in full[6:]]
    assert len(resumed) == len(full) == 10  # resumed mid-epoch 2 (step 6 of 10)


def test_teacher_sequential_finetuning(teacher_sf: Any) -> None:
    run_dir, state = teacher_sf
    phases = [h["phase"] for h in state.history]
    assert phases == ["image"] * 6 + ["text"] * 6
    assert "kd_kl" not in state.history[0] and "hn" not in state.history[0]
    assert _falls([h["loss"] for h in state.history if h["phase"] == "image"])
    teacher = load_model(run_dir / "best.pt")
    assert teacher.leanclip_config["kind"] == "teacher"


def test_teacher_sf_freezes_the_other_tower(dataset: tuple[Path, Path, Path], teacher_sf: Any) -> None:
    run_dir, _ = teacher_sf
    seed_everything(0)  # as Stage2Trainer does before building the model
    start = stage2.build_stage2_models(tiny_stage2_config(*dataset, "unused", {"kind": "teacher"}, None))[0]
    after_image = read_checkpoint(run_dir / "best_phase0.pt")["state_dict"]
    initial = start.state_dict()
    # phase "image" changed the image tower only (seeded identically, so initial == start)
    assert not torch.equal(after_image["visual.proj"], initial["visual.proj"])
    assert torch.equal(after_image["text_projection"], initial["text_projection"])
    assert torch.equal(after_image["token_embedding.weight"], initial["token_embedding.weight"])


@pytest.fixture(scope="module")
def student_sf(
    dataset: tuple[Path, Path, Path], stage1_run: Any, teacher_sf: Any
) -> tuple[stage2.Stage2Trainer, stage2.Stage2State]:
    root, json_path, image_root = dataset
    config = tiny_stage2_config(
        root,
        json_path,
        image_root,
        "student_sf",
        {"kind": "student", "init": str(root / "stage1" / "final.pt")},
        str(teacher_sf[0] / "best.pt"),
        epochs=2,
        checkpoint_every=2,
        keep_checkpoints=True,
    )
    trainer = stage2.Stage2Trainer(config)
    return trainer, trainer.run()


def test_student_sf_with_kd_and_hn(student_sf: Any) -> None:
    trainer, state = student_sf
    image_steps = [h for h in state.history if h["phase"] == "image"]
    text_steps = [h for h in state.history if h["phase"] == "text"]
    assert len(image_steps) == len(text_steps) == 6
    for h in state.history:
        assert {"t2v", "v2t", "kd_kl", "kd_contrastive", "hn"} <= set(h)
        assert h["loss"] == pytest.approx(
            h["t2v"] + h["v2t"] + h["kd_kl"] + h["kd_contrastive"] + h["hn"], rel=1e-5
        )
    assert _falls([h["loss"] for h in image_steps])
    assert _falls([h["loss"] for h in text_steps])
    best = load_model(trainer.run_dir / "best.pt")
    assert best.leanclip_config["kind"] == "student"
    assert len(state.evals) == 4 and all(0 <= e["mean_recall"] <= 100 for e in state.evals)


def test_hard_negatives_exclude_positives(student_sf: Any) -> None:
    trainer, _ = student_sf
    corpus = trainer.train
    k = trainer.train_cfg["hn_k"]
    for phase_index, phase in enumerate(("image", "text")):
        plan = trainer.epoch_plan(phase_index, phase, 0, None)  # cached: the plan trained on
        if phase == "image":
            ids = plan["i2t"]
            assert ids.shape == (len(corpus), k) and (ids >= 0).all()
            for image, negatives in enumerate(ids):
                assert not set(negatives) & set(corpus.image_captions[image])
        else:
            ids = plan["t2i"]  # per caption
            assert ids.shape == (len(corpus.captions), k)
            for caption, negatives in enumerate(ids):
                assert corpus.caption_image[caption] not in negatives and (negatives >= 0).all()
    # the miner ranks by similarity: a positive planted as the best match is still skipped
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    corpus_emb = np.concatenate([queries * 10, rng.normal(size=(6, 8)).astype(np.float32)])
    groups = np.arange(10)
    ids = stage2.mine(queries, corpus_emb, 3, np.arange(4), groups)
    assert all(q not in row for q, row in enumerate(ids))
    scores = np.einsum("qd,qkd->qk", queries, corpus_emb[ids])
    assert (np.diff(scores, axis=1) <= 1e-5).all()


def test_stage2_resume_gives_identical_next_losses(student_sf: Any) -> None:
    trainer, state = student_sf
    config = copy.deepcopy(trainer.config)
    for step in (4, 8):  # mid-epoch in the image phase, then in the text phase
        resumed = stage2.Stage2Trainer(config)
        rstate = resumed.run(resume=trainer.run_dir / f"step{step}.pt")
        assert [h["loss"] for h in rstate.history[step:]] == [h["loss"] for h in state.history[step:]]
        assert rstate.global_step == state.global_step


def test_evaluation_matches_brute_force(dataset: tuple[Path, Path, Path], student_sf: Any) -> None:
    root, json_path, image_root = dataset
    trainer, _ = student_sf
    model = load_model(trainer.run_dir / "best.pt")
    test = load_karpathy(json_path, image_root, "test")
    got = evaluate.evaluate_model(model, test, batch_size=4)
    # independent brute force: encode one by one, rank with numpy
    from training.data import image_to_tensor, load_image, prepare_pixels
    from training.models import tokenize

    with torch.no_grad():
        img = torch.cat(
            [
                model.encode_image(
                    prepare_pixels(model, image_to_tensor(load_image(p), model.image_size)[None])
                )
                for p in test.images
            ]
        )
        txt = model.encode_text(tokenize(test.captions))
    img = torch.nn.functional.normalize(img, dim=-1).numpy()
    txt = torch.nn.functional.normalize(txt, dim=-1).numpy()
    sims = txt @ img.T
    for k in (1, 5, 10):
        rank_t2i = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        expected_t2i = 100 * np.mean(
            [test.caption_image[c] in rank_t2i[c] for c in range(len(test.captions))]
        )
        rank_i2t = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]
        expected_i2t = 100 * np.mean(
            [bool(set(rank_i2t[i]) & set(test.image_captions[i])) for i in range(len(test))]
        )
        assert got[f"t2i_R@{k}"] == pytest.approx(expected_t2i, abs=1e-6)
        assert got[f"i2t_R@{k}"] == pytest.approx(expected_i2t, abs=1e-6)
    assert got["t2i_R@10"] == 100.0  # 10 test images: every image is within the top 10
    folds = evaluate.fold_recalls(img, txt, test, folds=2)
    first = evaluate.retrieval_recalls(img[:5], txt[:25], test.caption_image[:25])
    second = evaluate.retrieval_recalls(img[5:], txt[25:], test.caption_image[25:] - 5)
    assert folds["t2i_R@1"] == pytest.approx((first["t2i_R@1"] + second["t2i_R@1"]) / 2)
    table = evaluate.format_table1({"S": {"coco1k": folds, "coco5k": got}})
    assert "MSCOCO (1K)" in table and f"{got['t2i_R@1']:.1f}" in table


def test_ablation_flags_select_phases_and_terms(
    dataset: tuple[Path, Path, Path], stage1_run: Any, teacher_sf: Any
) -> None:
    root, json_path, image_root = dataset
    teacher = str(teacher_sf[0] / "best.pt")
    model = {"kind": "student", "init": str(root / "stage1" / "final.pt"), "text_from_teacher": True}
    joint = stage2.Stage2Trainer(
        tiny_stage2_config(
            root, json_path, image_root, "no_sf", model, teacher, phases=["joint"], epochs=1, max_steps=2
        )
    ).run()
    assert {h["phase"] for h in joint.history} == {"joint"} and "hn" in joint.history[0]
    bare = stage2.Stage2Trainer(
        tiny_stage2_config(
            root,
            json_path,
            image_root,
            "no_kd_hn",
            model,
            teacher,
            phases=["image"],
            kd=False,
            hn=False,
            epochs=1,
            max_rank_batch=20,
        )
    ).run()
    assert "kd_kl" not in bare.history[0] and "hn" not in bare.history[0]
    assert bare.history[0]["loss"] == pytest.approx(bare.history[0]["t2v"] + bare.history[0]["v2t"])


def test_table2_runner_prints_the_paper_layout(
    dataset: tuple[Path, Path, Path], teacher_sf: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from training import ablations

    root, json_path, image_root = dataset
    cfg_dir = root / "table2_configs"
    cfg_dir.mkdir()
    s1 = tiny_stage1_config(root, json_path, image_root, epochs=1, modalities=["image"])
    s2 = tiny_stage2_config(
        root,
        json_path,
        image_root,
        "unused",
        {"kind": "student", "text_from_teacher": True},
        str(teacher_sf[0] / "best.pt"),
        phases=["image"],
        epochs=1,
    )
    (cfg_dir / "s1.yaml").write_text(yaml.safe_dump(s1))
    (cfg_dir / "s2.yaml").write_text(yaml.safe_dump(s2))
    table = {
        "out_dir": str(root / "table2"),
        "default_stage1": "s1.yaml",
        "default_stage2": "s2.yaml",
        "eval_batch_size": 16,
        "num_workers": 0,
        "test": {
            "format": "karpathy",
            "path": str(json_path),
            "image_root": str(image_root),
            "split": "test",
        },
        "rows": [
            {"label": "f_v^S", "name": "full", "stage1_loss": "infonce"},
            {
                "label": "w/o KD+HN",
                "name": "no_kd_hn",
                "stage1_loss": "infonce",
                "stage2_overrides": ["train.kd=false", "train.hn=false"],
            },
        ],
    }
    (cfg_dir / "table2.yaml").write_text(yaml.safe_dump(table))
    assert ablations.main(["--config", str(cfg_dir / "table2.yaml")]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "MSCOCO (5K)" in lines[0]
    full, ablated = lines[-2], lines[-1]
    assert full.startswith("f_v^S") and ablated.startswith("w/o KD+HN")
    assert len(full.split("|")[1].split()) == 3  # R@1 R@5 R@10
    delta = float(ablated.split("|")[2])
    r1 = [float(line.split("|")[1].split()[0]) for line in (full, ablated)]
    assert delta == pytest.approx(r1[1] - r1[0], abs=0.051)
    # both rows share one stage-1 run
    assert sorted(p.name for p in (root / "table2").iterdir()) == ["full", "no_kd_hn", "stage1_infonce"]


def test_evaluate_cli_and_table1_runner(
    dataset: tuple[Path, Path, Path], student_sf: Any, teacher_sf: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    root, json_path, image_root = dataset
    best = student_sf[0].run_dir / "best.pt"
    out_json = root / "eval.json"
    assert evaluate.main(evaluate_argv(f"S={best}", json_path, image_root, out_json, flickr=True)) == 0
    printed = capsys.readouterr().out
    numbers = json.loads(out_json.read_text())["S"]
    assert set(numbers) == {"coco5k", "coco1k", "flickr1k"}
    assert "MSCOCO (1K)" in printed and "Flickr 30K" in printed
    assert f"{numbers['coco1k']['t2i_R@1']:.1f}" in printed.splitlines()[4]
    # the Table-1 runner: no steps left to run, evaluation of the listed checkpoints
    models = {
        "T'": {"coco": str(teacher_sf[0] / "best.pt")},
        "S": {"coco": str(best)},
        "missing": {"coco": str(root / "none.pt")},
    }
    assert run_table1_evaluation(root, json_path, image_root, models) == 0
    lines = capsys.readouterr().out.splitlines()
    s_row = next(line for line in lines if line.startswith("S "))
    assert f"{numbers['coco5k']['t2i_R@1']:.1f}" in s_row  # same model, same numbers
    assert any(line.startswith("missing") and "-" in line for line in lines)
