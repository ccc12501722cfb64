"""The shipped experiment configs load, name only known settings, and carry the paper's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import stage1, stage2
from training.train_utils import apply_overrides, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
OURS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("stage1_minilm"))


@pytest.mark.parametrize("path", OURS, ids=lambda p: p.name)
def test_config_loads_with_known_settings(path: Path) -> None:
    config = load_config(path)
    assert config, path
    if "run_dir" not in config:
        return  # shared fragments and table runners
    defaults = stage2.DEFAULT_TRAIN if "teacher" in config else stage1.DEFAULT_TRAIN
    assert set(config["train"]) <= set(defaults), path.name
    assert config["train"]["lr"] == 3e-4 and config["train"]["weight_decay"] == 0.1
    assert config["train"]["warmup_steps"] == 10000


def test_paper_settings() -> None:
    s6 = load_config(CONFIGS / "s6_stage1.yaml")
    assert s6["train"]["batch_size"] == 84 and s6["train"]["epochs"] == 1
    assert s6["model"]["text_layers"] == 6
    assert s6["model"]["image_backbone"] == "vit_small_patch16_224"
    assert load_config(CONFIGS / "s4_stage1.yaml")["model"]["text_layers"] == 4
    s6b = load_config(CONFIGS / "s6_stage2_coco.yaml")
    assert s6b["train"]["batch_size"] == 96 and s6b["train"]["epochs"] == 5
    assert s6b["train"]["phases"] == ["image", "text"] and s6b["train"]["kd"] and s6b["train"]["hn"]
    assert s6b["model"]["init"] == load_config(CONFIGS / "s6_stage1.yaml")["run_dir"] + "/final.pt"
    assert s6b["teacher"] == load_config(CONFIGS / "teacher_sf_coco.yaml")["run_dir"] + "/best.pt"
    fast = load_config(CONFIGS / "cpu_fast_stage1.yaml")
    assert fast["model"]["image_backbone"] == "vit_small_patch32_224"
    assert load_config(CONFIGS / "table2_no_sf.yaml")["train"]["phases"] == ["joint"]
    no_both = load_config(CONFIGS / "table2_no_kd_hn.yaml")["train"]
    assert not no_both["kd"] and not no_both["hn"] and no_both["phases"] == ["image"]
    rows = load_config(CONFIGS / "table2.yaml")["rows"]
    assert [r["label"] for r in rows] == [
        "f_v^S",
        "w/o stage-1",
        "stage-1 MSE",
        "stage-1 InfoNCE",
        "w/o SF",
        "w/o KD",
        "w/o HN",
        "w/o KD+HN",
    ]
    for step in load_config(CONFIGS / "table1.yaml")["steps"]:
        assert (CONFIGS / step["config"]).is_file()


def test_overrides_and_unknown_settings(tmp_path: Path) -> None:
    config = apply_overrides({"train": {"lr": 1}}, ["train.lr=2e-4", "train.phases=[joint]"])
    assert config["train"] == {"lr": 2e-4, "phases": ["joint"]}
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="unknown stage-2 train settings.*'hn_kk'"):
        stage2.Stage2Trainer({"run_dir": str(tmp_path), "train": {"hn_kk": 3}})


def test_minilm_recipe_is_delegated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    import training

    seen: list[dict] = []
    fake = types.ModuleType("training.minilm_stage1")
    fake.main = lambda config: seen.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.minilm_stage1", fake)
    monkeypatch.setattr(training, "minilm_stage1", fake, raising=False)
    (tmp_path / "c.yaml").write_text("recipe: minilm_text\nrun_dir: x\n")
    assert stage1.main(["--config", str(tmp_path / "c.yaml"), "--set", "train.lr=1e-4"]) == 0
    assert seen == [{"recipe": "minilm_text", "run_dir": "x", "train": {"lr": 1e-4}}]
