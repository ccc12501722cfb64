"""Time training steps of the real-size shapes (random weights, no data): the numbers behind the
GPU-hour estimates in docs/training.md.

    python -m training.step_timing --batch 16 --steps 3 [--device cuda] [--json-out t.json]
    torchrun --nproc_per_node N -m training.step_timing --smoke --steps 300   # scripts/gpu_smoke.sh

``--smoke`` runs the real trainers (stage 1, then stage 2 with KD + HN) under DDP on generated
data at full model size (random-init ViT-B/32 teacher, ViT-S/16 and ViT-S/32 students, S6 / S4
text; nothing is downloaded), bf16 autocast on CUDA, and prints images/s per stage, peak GPU
memory and the projected wall time of each Table 1/2 row. ``--dry-run`` does the same with tiny
models and a few steps on the CPU (what the tests run).

Measures, per step (forward + backward + AdamW update): the stage-1 student image step (ViT-S/16
or the ViT-S/32 preset, against cached teacher embeddings), the stage-1 text step (S6 / S4
layers), the stage-2 image-phase step with KD + HN (k=8), and the no-grad teacher image forward
used to build caches. Prints one JSON line per measurement, including peak GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from training import losses
from training.models import build_student, build_teacher
from training.train_utils import autocast, make_optimizer

if TYPE_CHECKING:
    from training.distributed import DistInfo


def _time(fn: Callable[[], None], steps: int, device: torch.device) -> list[float]:
    fn()  # warm-up (allocations, kernels)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure(
    batch: int,
    steps: int,
    device: torch.device,
    backbones: Sequence[str],
    text_layers: Sequence[int],
    amp: bool,
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    teacher = build_teacher("ViT-B-32", pretrained=None).to(device).eval().requires_grad_(False)
    results: list[dict[str, Any]] = []
    dim = 512
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    tokens = torch.randint(1, 49000, (batch, 77), device=device)
    tokens[:, 20] = 49407  # end-of-text
    target = F.normalize(torch.randn(batch, dim, device=device), dim=-1)
    negatives = F.normalize(torch.randn(batch, 8, dim, device=device), dim=-1)

    def record(name: str, times: list[float]) -> None:
        entry = {
            "measure": name,
            "batch": batch,
            "device": str(device),
            "median_s": statistics.median(times),
            "min_s": min(times),
            "steps": len(times),
        }
        if device.type == "cuda":
            entry["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        results.append(entry)
        print(json.dumps(entry), flush=True)

    def teacher_forward() -> None:
        with torch.no_grad(), autocast(device, amp):
            teacher.encode_image(pixels)

    record("teacher image forward (no grad)", _time(teacher_forward, steps, device))

    for backbone in backbones:
        student = build_student(backbone, text_layers[0], teacher=teacher).to(device).train()
        opt = make_optimizer(student.visual.named_parameters(), 3e-4, 0.1)
        opt.add_param_group({"params": list(student.image_projection.parameters()), "weight_decay": 0.1})

        def stage1_image() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp):
                emb = student.encode_image(pixels)
            losses.intra_modal_infonce(emb, target, 0.05).backward()
            opt.step()

        record(f"stage-1 image step {backbone}", _time(stage1_image, steps, device))

        def stage2_image() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp):
                emb = student.encode_image(pixels)
            t2v, v2t = losses.clip_loss(emb, target, student.logit_scale)
            kd = losses.matching_kl(
                emb, target, target, target, student.logit_scale, teacher.logit_scale
            ) + losses.intra_modal_infonce(emb, target, 0.05)
            hn = losses.hard_negative_infonce(emb, target, negatives, student.logit_scale)
            (t2v + v2t + kd + hn).backward()
            opt.step()

        record(f"stage-2 image step (KD+HN) {backbone}", _time(stage2_image, steps, device))

    for n in text_layers:
        student = build_student(backbones[0], n, teacher=teacher).to(device).train()
        opt = make_optimizer(student.text.named_parameters(), 3e-4, 0.1)

        def stage1_text() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp):
                emb = student.encode_text(tokens)
            losses.intra_modal_infonce(emb, target, 0.05).backward()
            opt.step()

        record(f"stage-1 text step {n} layers", _time(stage1_text, steps, device))
    return results


# --------------------------------------------------------------------------------------------
# The GPU smoke run: the real trainers on generated data


# Table 1/2 runs as (label, stage, image backbone, text layers, items per epoch, epochs,
# phases). Items: CC3M 3,318,333 captions (stage 1 wraps its ~2.8M images), COCO 566,747 and
# Flickr30k 145,000 training captions.
TABLE_RUNS = (
    ("stage 1 S6 (CC3M)", 1, "vit_small_patch16_224", 6, 3_318_333, 1, 1),
    ("stage 1 S4 (CC3M)", 1, "vit_small_patch16_224", 4, 3_318_333, 1, 1),
    ("teacher SF T' (COCO)", 2, "teacher", 12, 566_747, 5, 2),
    ("teacher SF T' (Flickr)", 2, "teacher", 12, 145_000, 5, 2),
    ("stage 2 S6 (COCO)", 2, "vit_small_patch16_224", 6, 566_747, 5, 2),
    ("stage 2 S4 (COCO)", 2, "vit_small_patch16_224", 4, 566_747, 5, 2),
    ("stage 2 S6 (Flickr)", 2, "vit_small_patch16_224", 6, 145_000, 5, 2),
    ("stage 2 S4 (Flickr)", 2, "vit_small_patch16_224", 4, 145_000, 5, 2),
    ("Table 2 stage 1, image only (CC3M)", 1, "vit_small_patch16_224", 0, 2_800_000, 1, 1),
    ("Table 2 stage 2 row, image phase (COCO)", 2, "vit_small_patch16_224", 0, 566_747, 5, 1),
    ("stage 1 ViT-S/32 preset (CC3M)", 1, "vit_small_patch32_224", 6, 3_318_333, 1, 1),
)


def _synthetic_corpus(root: Any, n_images: int, size: int, n_texts: int) -> dict[str, Any]:
    """Random-noise JPEGs with five captions each (a Karpathy json), plus an unpaired caption
    file for stage 1: generated once, offline."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    images = root / "images" / "train"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = [
        "red",
        "blue",
        "dog",
        "cat",
        "car",
        "tree",
        "sky",
        "house",
        "man",
        "woman",
        "ball",
        "beach",
        "street",
        "field",
        "city",
        "water",
    ]
    entries = []
    for i in range(n_images):
        path = images / f"{i:06d}.jpg"
        if not path.is_file():
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=80)
        split = "train" if i < n_images - max(8, n_images // 10) else "val"
        entries.append(
            {
                "filepath": "train",
                "filename": path.name,
                "split": split,
                "sentences": [{"raw": " ".join(rng.choice(words, 8))} for _ in range(5)],
            }
        )
    (root / "karpathy.json").write_text(json.dumps({"images": entries}))
    (root / "texts.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(n_texts)))
    return {
        "json": str(root / "karpathy.json"),
        "root": str(root / "images"),
        "texts": str(root / "texts.txt"),
    }


@dataclass
class _Smoke:
    """What every smoke run shares: the process group, the generated data and the base configs."""

    info: DistInfo
    work: Path
    tiny: bool
    n_images: int
    g1: int  # stage-1 batch
    g2: int  # stage-2 batch
    karpathy: dict[str, Any]
    model: dict[str, Any]
    common: dict[str, Any]


def _smoke_setup(steps: int, dry_run: bool, workdir: str) -> _Smoke:
    """Start the process group and generate the corpus (on the main process)."""
    import os
    import tempfile

    from training.distributed import barrier, init_distributed

    info = init_distributed("cpu" if dry_run else None)
    work = Path(workdir or tempfile.mkdtemp(prefix="leanclip_smoke_"))
    tiny = dry_run
    n_images = 48 if dry_run else 2048
    size = 40 if dry_run else 256
    g1, g2 = (8, 10) if dry_run else (84, 96)
    data_dir = work / "data"
    if info.is_main:
        _synthetic_corpus(data_dir, n_images, size, n_texts=max(g1 * (steps + 1), 64))
    barrier()
    karpathy = {
        "format": "karpathy",
        "path": str(data_dir / "karpathy.json"),
        "image_root": str(data_dir / "images"),
    }
    model = {"tiny": tiny, "teacher_name": "ViT-B-32", "teacher_pretrained": None, "image_pretrained": None}
    common = {
        "num_workers": 0 if dry_run else min(8, os.cpu_count() or 1),
        "lr": 3e-4,
        "warmup_steps": 10000,
        "checkpoint_every": 0,
        "log_every": 50,
        "amp": True,
    }
    return _Smoke(info, work, tiny, n_images, g1, g2, karpathy, model, common)


def _peak(device: torch.device) -> float | None:
    """Peak GPU memory (GiB) since the last call, which resets it; None off CUDA."""
    if device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return value


def _rate(history: list[dict[str, Any]], key: str = "batch") -> tuple[float, float]:
    """(median seconds per step, items per second), past the first 5 steps when there are more."""
    timed = history[min(5, len(history) - 1) :] if len(history) > 1 else history
    seconds = statistics.median(h["seconds"] for h in timed)
    return seconds, statistics.median(h[key] for h in timed) / seconds


def _record(s: _Smoke, runs: dict[str, Any], name: str, history: list[dict[str, Any]]) -> None:
    seconds, images_s = _rate(history)
    runs[name] = {
        "seconds_per_step": seconds,
        "images_per_s": images_s,
        "peak_gib": _peak(s.info.device),
        "steps": len(history),
    }
    if s.info.is_main:
        print(json.dumps({"run": name, **runs[name]}), flush=True)


def _smoke_stage1(s: _Smoke, steps: int, runs: dict[str, Any]) -> None:
    from training import stage1

    data_dir = s.work / "data"
    for backbone, layers in (
        ("vit_small_patch16_224", 6),
        ("vit_small_patch16_224", 4),
        ("vit_small_patch32_224", 6),
    ):
        name = f"stage1 {backbone} S{layers}"
        config = {
            "run_dir": str(s.work / f"s1_{backbone}_{layers}"),
            "seed": 0,
            # (the tiny teacher of a dry run has 4 text layers: S6 -> 3, S4 -> 2)
            "model": {
                **s.model,
                "image_backbone": backbone,
                "text_layers": layers // 2 if s.tiny else layers,
            },
            "data": {
                "images": {**s.karpathy, "split": "train"},
                "texts": {"format": "lines", "path": str(data_dir / "texts.txt")},
            },
            "train": {
                **s.common,
                "batch_size": s.g1,
                "epochs": 1,
                "max_steps": steps,
                "embed_batch_size": 256,
            },
        }
        trainer = stage1.Stage1Trainer(config, s.info)
        _peak(s.info.device)
        _record(s, runs, name, trainer.run())


def _smoke_stage2(s: _Smoke, steps: int, runs: dict[str, Any]) -> None:
    import math

    from training import stage2
    from training.distributed import barrier

    s1_ckpt = s.work / "s1_vit_small_patch16_224_6" / "latest.pt"  # the S6 student so far
    teacher_ckpt = s.work / "teacher.pt"
    if s.info.is_main:  # T' stand-in: the random teacher saved as a checkpoint
        from training.models import save_checkpoint

        save_checkpoint(teacher_ckpt, build_teacher("ViT-B-32", None, tiny=s.tiny), {"stage": 2})
    barrier()
    per_epoch = (s.n_images - max(8, s.n_images // 10)) * 5 // s.g2
    for name, kind, extra in (
        ("stage2 teacher SF", "teacher", {}),
        ("stage2 student S6 KD+HN", "student", {}),
    ):
        config = {
            "run_dir": str(s.work / name.replace(" ", "_")),
            "seed": 0,
            "teacher": None if kind == "teacher" else str(teacher_ckpt),
            "model": {**s.model, "kind": kind, **({} if kind == "teacher" else {"init": str(s1_ckpt)})},
            "data": {"train": {**s.karpathy, "split": "train"}, "val": {**s.karpathy, "split": "val"}},
            "train": {
                **s.common,
                "batch_size": s.g2,
                "epochs": max(2, math.ceil(steps / max(1, per_epoch))),
                "max_steps": steps,
                "kd": kind == "student",
                "hn": kind == "student",
                "hn_k": 8,
                "eval_batch_size": 256,
                **extra,
            },
        }
        trainer = stage2.Stage2Trainer(config, s.info)
        _peak(s.info.device)
        state = trainer.run()
        _record(s, runs, name, state.history)


def _projections(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """Steps of each table run x the measured time of its kind of step."""
    from training.train_utils import plan_schedule

    projections = []
    for label, stage, backbone, layers, items, epochs, phases in TABLE_RUNS:
        schedule = plan_schedule(items, 84 if stage == 1 else 96, epochs, 10000, 0.5)
        if stage == 1:
            key = f"stage1 {backbone} S{layers or 6}"
        else:
            key = "stage2 teacher SF" if backbone == "teacher" else "stage2 student S6 KD+HN"
        step_s = runs[key]["seconds_per_step"]
        hours = schedule.total_steps * phases * step_s / 3600
        projections.append(
            {
                "row": label,
                "steps": schedule.total_steps * phases,
                "measured_as": key,
                "projected_hours": hours,
            }
        )
    return projections


def smoke(steps: int, dry_run: bool, workdir: str, json_out: str | None) -> dict[str, Any]:
    from training.distributed import barrier

    s = _smoke_setup(steps, dry_run, workdir)
    results: dict[str, Any] = {
        "world_size": s.info.world_size,
        "device": str(s.info.device),
        "dry_run": dry_run,
        "steps": steps,
        "runs": {},
    }
    _smoke_stage1(s, steps, results["runs"])
    _smoke_stage2(s, steps, results["runs"])
    projections = _projections(results["runs"])
    results["projections"] = projections
    if s.info.is_main:
        print(f"{'run':<44}{'steps':>10}{'hours':>10}   (measured as)")
        for p in projections:
            print(f"{p['row']:<44}{p['steps']:>10}{p['projected_hours']:>10.2f}   {p['measured_as']}")
        if json_out:
            Path(json_out).write_text(json.dumps(results, indent=2))
    barrier()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backbone", action="append", help="default: vit_small_patch16_224 and vit_small_patch32_224"
    )
    parser.add_argument("--text-layers", type=int, action="append", help="default: 6 and 4")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--json-out")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run the real trainers under DDP on generated data (GPU smoke run)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --smoke: tiny models on the CPU, to check the run end to end",
    )
    parser.add_argument("--workdir", default="", help="with --smoke: where data and runs go")
    args = parser.parse_args(argv)
    if args.smoke:
        smoke(args.steps, args.dry_run, args.workdir, args.json_out)
        return 0
    results = measure(
        args.batch,
        args.steps,
        torch.device(args.device),
        args.backbone or ["vit_small_patch16_224", "vit_small_patch32_224"],
        args.text_layers or [6, 4],
        not args.no_amp,
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
