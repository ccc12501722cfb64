"""The paper's schedule on the shipped configs: an epoch visits every caption once, the 10,000
warm-up steps end inside the run and the rate then decays (cosine) to zero, for the COCO and the
Flickr30k stage-2 configs and for stage 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.train_utils import cosine_with_warmup, load_config, plan_schedule

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"

# Karpathy splits (train + restval for COCO): images, captions
COCO_TRAIN = (113_287, 566_747)
FLICKR_TRAIN = (29_000, 145_000)


def _lrs(schedule, lr: float) -> list[float]:
    """The learning rate of every step, as the trainers' LambdaLR gives it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    factor = cosine_with_warmup(opt, schedule.warmup_steps, schedule.total_steps).lr_lambdas[0]
    return [lr * factor(step) for step in range(schedule.total_steps)]


@pytest.mark.parametrize(
    "config, captions, steps, warmup",
    [
        ("s6_stage2_coco.yaml", COCO_TRAIN[1], 5_903, 10_000),
        ("s4_stage2_coco.yaml", COCO_TRAIN[1], 5_903, 10_000),
        ("teacher_sf_coco.yaml", COCO_TRAIN[1], 5_903, 10_000),
        ("s6_stage2_flickr.yaml", FLICKR_TRAIN[1], 1_510, 3_775),
        ("teacher_sf_flickr.yaml", FLICKR_TRAIN[1], 1_510, 3_775),
    ],
)
def test_stage2_schedule_shape(config: str, captions: int, steps: int, warmup: int) -> None:
    train = load_config(CONFIGS / config)["train"]
    assert train["batch_size"] == 96 and train["epochs"] == 5  # the paper's global batch
    schedule = plan_schedule(
        captions, train["batch_size"], train["epochs"], train["warmup_steps"], train["warmup_max_fraction"]
    )
    # an epoch is every caption once (not one caption per image: 1,180 steps on COCO)
    assert schedule.steps_per_epoch == steps == captions // 96
    assert schedule.total_steps == 5 * steps
    assert schedule.warmup_steps == warmup < schedule.total_steps
    lrs = _lrs(schedule, train["lr"])
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert peak == warmup - 1  # linear warm-up reaches the base rate at its last step ...
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[peak] == pytest.approx(train["lr"])
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # ... then decay
    assert lrs[-1] < 1e-3 * train["lr"]  # to ~0 by the end of the phase


def test_stage1_schedule_shape() -> None:
    train = load_config(CONFIGS / "s6_stage1.yaml")["train"]
    assert train["batch_size"] == 84 and train["epochs"] == 1
    schedule = plan_schedule(
        3_318_333, 84, 1, train["warmup_steps"], train["warmup_max_fraction"]
    )  # CC3M's captions
    assert schedule.steps_per_epoch == 39_503 and schedule.warmup_steps == 10_000


def test_warmup_that_never_ends_is_refused() -> None:
    with pytest.raises(ValueError, match="decays within the run"):
        plan_schedule(1000, 10, 1, 10_000, 1.0)
    with pytest.raises(ValueError, match="fewer than one global batch of 96"):
        plan_schedule(95, 96, 5, 10, 0.5)
