"""Time training steps of the real-size shapes (random weights, no data): the numbers behind the
GPU-hour estimates in docs/training.md.

    python -m training.step_timing --batch 16 --steps 3 [--device cuda] [--json-out t.json]

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
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from training import losses
from training.models import build_student, build_teacher
from training.train_utils import autocast, make_optimizer


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


def measure(batch: int, steps: int, device: torch.device, backbones: Sequence[str],
            text_layers: Sequence[int], amp: bool) -> list[dict[str, Any]]:
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
        entry = {"measure": name, "batch": batch, "device": str(device),
                 "median_s": statistics.median(times), "min_s": min(times), "steps": len(times)}
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
        opt.add_param_group({"params": list(student.image_projection.parameters()),
                             "weight_decay": 0.1})

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
            kd = losses.matching_kl(emb, target, target, target, student.logit_scale,
                                    teacher.logit_scale) + losses.intra_modal_infonce(
                emb, target, 0.05)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", action="append",
                        help="default: vit_small_patch16_224 and vit_small_patch32_224")
    parser.add_argument("--text-layers", type=int, action="append", help="default: 6 and 4")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    results = measure(args.batch, args.steps, torch.device(args.device),
                      args.backbone or ["vit_small_patch16_224", "vit_small_patch32_224"],
                      args.text_layers or [6, 4], not args.no_amp)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
