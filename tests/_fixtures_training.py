"""Tiny generated datasets and configs for the training tests (no network, seconds on a CPU)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 40), "purple": (150, 40, 170), "white": (240, 240, 240),
           "black": (15, 15, 15), "orange": (240, 140, 20)}
SHAPES = ("square", "stripes", "dots")


def make_image(colour: tuple[int, int, int], shape: str, seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.asarray(colour, np.float32)[None, None, :].repeat(size, 0).repeat(size, 1)
    if shape == "stripes":
        base[:, ::6] = 255 - base[:, ::6]
    elif shape == "dots":
        base[::8, ::8] = 255 - base[::8, ::8]
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def make_karpathy(root: Path, n_train: int = 24, n_val: int = 8, n_test: int = 10,
                  broken: int = 0) -> tuple[Path, Path]:
    """A COCO-style Karpathy json with 5 captions per image; ``broken`` train images are
    written as garbage bytes (unreadable)."""
    image_root = root / "images"
    (image_root / "train2014").mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    names = list(COLOURS)
    idx = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for _ in range(n):
            colour = names[idx % len(names)]
            shape = SHAPES[(idx // len(names)) % len(SHAPES)]
            filename = f"img{idx:04d}.jpg"
            path = image_root / "train2014" / filename
            if split == "train" and idx < broken:
                path.write_bytes(b"not an image")
            else:
                make_image(COLOURS[colour], shape, idx).save(path, quality=95)
            sentences = [{"raw": f"a {colour} {shape} picture number {idx % 7}"},
                         {"raw": f"{colour} {shape}"},
                         {"raw": f"an image that is {colour}"},
                         {"raw": f"the {shape} pattern in {colour}"},
                         {"raw": f"photo {idx}: {colour} with {shape}"}]
            entries.append({"filepath": "train2014", "filename": filename, "imgid": idx,
                            "split": split if split != "train" or idx % 5 else "restval",
                            "sentences": sentences})
            idx += 1
    json_path = root / "dataset_coco.json"
    json_path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return json_path, image_root


def tiny_stage1_config(root: Path, json_path: Path, image_root: Path, **train: Any
                       ) -> dict[str, Any]:
    return {
        "run_dir": str(root / "stage1"), "seed": 0, "device": "cpu",
        "model": {"tiny": True, "teacher_pretrained": None,
                  "image_backbone": "vit_small_patch16_224", "text_layers": 2},
        "data": {"images": {"format": "karpathy", "path": str(json_path),
                            "image_root": str(image_root), "split": "train"},
                 "texts": {"format": "karpathy", "path": str(json_path),
                           "image_root": str(image_root), "split": "train"},
                 "paired": {"format": "karpathy", "path": str(json_path),
                            "image_root": str(image_root), "split": "train"}},
        "train": {"batch_size": 8, "epochs": 2, "lr": 1e-3, "warmup_steps": 2,
                  "num_workers": 0, "checkpoint_every": 0, "embed_batch_size": 16,
                  "log_every": 1000, **train},
    }


def tiny_stage2_config(root: Path, json_path: Path, image_root: Path, run: str,
                       model: dict[str, Any], teacher: str | None, **train: Any
                       ) -> dict[str, Any]:
    return {
        "run_dir": str(root / run), "seed": 0, "device": "cpu", "teacher": teacher,
        "model": {"tiny": True, "teacher_pretrained": None, **model},
        "data": {"train": {"format": "karpathy", "path": str(json_path),
                           "image_root": str(image_root), "split": "train"},
                 "val": {"format": "karpathy", "path": str(json_path),
                         "image_root": str(image_root), "split": "val"}},
        "train": {"batch_size": 8, "epochs": 2, "lr": 1e-3, "warmup_steps": 2,
                  "num_workers": 0, "checkpoint_every": 0, "eval_batch_size": 16, "hn_k": 3,
                  "log_every": 1000, **train},
    }


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny_coco")
    json_path, image_root = make_karpathy(root)
    return root, json_path, image_root


def require_engine() -> Any:
    """The Rust engine (leanclip.mine_hard_negatives / leanclip.Index) must be built
    (maturin develop); the training code has no numpy fallback by design."""
    import leanclip

    leanclip.Index  # noqa: B018  (raises ImportError when the extension is not built)
    return leanclip


def write_shard(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    """A webdataset tar shard of (key, jpeg bytes, caption) samples."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, payload in (("jpg", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def jpeg_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    make_image((i * 30 % 255, 100, 100), "square", i).save(buf, format="JPEG")
    return buf.getvalue()
