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

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 40),
    "purple": (150, 40, 170),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
    "orange": (240, 140, 20),
}
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


def make_karpathy(
    root: Path, n_train: int = 24, n_val: int = 8, n_test: int = 10, broken: int = 0
) -> tuple[Path, Path]:
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
            sentences = [
                {"raw": f"a {colour} {shape} picture number {idx % 7}"},
                {"raw": f"{colour} {shape}"},
                {"raw": f"an image that is {colour}"},
                {"raw": f"the {shape} pattern in {colour}"},
                {"raw": f"photo {idx}: {colour} with {shape}"},
            ]
            entries.append(
                {
                    "filepath": "train2014",
                    "filename": filename,
                    "imgid": idx,
                    "split": split if split != "train" or idx % 5 else "restval",
                    "sentences": sentences,
                }
            )
            idx += 1
    json_path = root / "dataset_coco.json"
    json_path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return json_path, image_root


def tiny_stage1_config(root: Path, json_path: Path, image_root: Path, **train: Any) -> dict[str, Any]:
    return {
        "run_dir": str(root / "stage1"),
        "seed": 0,
        "device": "cpu",
        "model": {
            "tiny": True,
            "teacher_pretrained": None,
            "image_backbone": "vit_small_patch16_224",
            "text_layers": 2,
        },
        "data": {
            "images": {
                "format": "karpathy",
                "path": str(json_path),
                "image_root": str(image_root),
                "split": "train",
            },
            "texts": {
                "format": "karpathy",
                "path": str(json_path),
                "image_root": str(image_root),
                "split": "train",
            },
            "paired": {
                "format": "karpathy",
                "path": str(json_path),
                "image_root": str(image_root),
                "split": "train",
            },
        },
        "train": {
            "batch_size": 8,
            "epochs": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
            "num_workers": 0,
            "checkpoint_every": 0,
            "embed_batch_size": 16,
            "log_every": 1000,
            **train,
        },
    }


def tiny_stage2_config(
    root: Path,
    json_path: Path,
    image_root: Path,
    run: str,
    model: dict[str, Any],
    teacher: str | None,
    **train: Any,
) -> dict[str, Any]:
    return {
        "run_dir": str(root / run),
        "seed": 0,
        "device": "cpu",
        "teacher": teacher,
        "model": {"tiny": True, "teacher_pretrained": None, **model},
        "data": {
            "train": {
                "format": "karpathy",
                "path": str(json_path),
                "image_root": str(image_root),
                "split": "train",
            },
            "val": {
                "format": "karpathy",
                "path": str(json_path),
                "image_root": str(image_root),
                "split": "val",
            },
        },
        # global batch 40: an epoch is every caption once (24 images x 5 = 120) in 3 steps
        "train": {
            "batch_size": 40,
            "epochs": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
            "num_workers": 0,
            "checkpoint_every": 0,
            "eval_batch_size": 16,
            "hn_k": 3,
            "log_every": 1000,
            **train,
        },
    }


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny_coco")
    json_path, image_root = make_karpathy(root)
    return root, json_path, image_root


def evaluate_argv(
    model: str, json_path: Path, image_root: Path, out: Path, *, flickr: bool = False
) -> list[str]:
    """``training.evaluate`` arguments: ``model`` (``LABEL=CHECKPOINT``) on the tiny Karpathy
    set as COCO (and as Flickr), no loader workers, numbers written to ``out``."""
    sets = ["--coco-json", str(json_path), "--coco-root", str(image_root)]
    if flickr:
        sets += ["--flickr-json", str(json_path), "--flickr-root", str(image_root)]
    return ["--model", model, *sets, "--workers", "0", "--json-out", str(out)]


def run_table1_evaluation(root: Path, json_path: Path, image_root: Path, models: dict[str, Any]) -> int:
    """The Table-1 runner (``training.ablations``) with no steps left, evaluating ``models``
    (label -> ``{"coco": checkpoint}``) on the tiny set's COCO test split; its exit code."""
    import yaml

    from training import ablations

    table1 = {
        "steps": [],
        "num_workers": 0,
        "evaluate": {
            "coco": {
                "format": "karpathy",
                "path": str(json_path),
                "image_root": str(image_root),
                "split": "test",
            },
            "models": models,
        },
    }
    (root / "table1.yaml").write_text(yaml.safe_dump(table1))
    return ablations.main(["--config", str(root / "table1.yaml")])


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


# --------------------------------------------------------------------------------------------
# Multi-process runs on CPU (gloo): W plain subprocesses joined through env:// on a free
# loopback port (what torchrun sets up, without its agent process).


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world_size: int, port: int, **extra: str) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` of a one-machine world (one thread each),
    with this checkout importable."""
    repo = Path(__file__).resolve().parents[1]
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def launch_world(
    world_size: int,
    tasks: list[dict[str, Any]],
    out_dir: Path,
    timeout: float = 300.0,
    expect_success: bool = True,
) -> list[Any]:
    """Run ``dist_worker`` in ``world_size`` processes over ``tasks``; returns the processes'
    (returncode, stderr tail). Each task writes its results under out_dir (rank 0)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    spec = out_dir / "tasks.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(tasks))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = rank_env(rank, world_size, port)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from tests._fixtures_training import dist_worker; dist_worker()",
                    str(spec),
                    str(out_dir),
                ],
                env=env,
                cwd=repo,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err[-3000:]))
    finally:
        for p in procs:  # a hung rank (e.g. a peer died) is ended here, by its own id
            if p.poll() is None:
                p.kill()
                p.wait()
    if expect_success and any(code != 0 for code, _ in results):
        raise AssertionError(
            "\n".join(f"rank {rank} exited {code}:\n{err}" for rank, (code, err) in enumerate(results))
        )
    return results


def dist_worker() -> None:
    """Entry point of one rank (see ``launch_world``)."""
    import signal
    import sys

    torch.set_num_threads(1)
    spec, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    from training.distributed import init_distributed

    info = init_distributed("cpu")
    for task in json.loads(spec.read_text()):
        kind, name = task["kind"], task["name"]
        if kind in ("stage1", "stage2"):
            from training import stage1, stage2

            trainer_cls = stage1.Stage1Trainer if kind == "stage1" else stage2.Stage2Trainer
            trainer = trainer_cls(task["config"], info)
            kill_at = task.get("kill_after_checkpoint")
            if kill_at is not None:  # die like a killed job, right after checkpoint N
                original = trainer._save

                def save_then_die(*args: Any, _original: Any = original, **kw: Any) -> None:
                    _original(*args, **kw)
                    if trainer.step >= kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)

                trainer._save = save_then_die  # type: ignore[method-assign]
            result = trainer.run(resume=task.get("resume"))
            history = result if kind == "stage1" else result.history
            model = trainer.student if kind == "stage1" else trainer.model
            if info.is_main:
                torch.save(
                    {
                        "history": history,
                        "state_dict": model.state_dict(),
                        "skipped_images": getattr(trainer, "skipped_images", None)
                        if kind == "stage1"
                        else result.skipped_images,
                    },
                    out_dir / f"{name}.pt",
                )
        elif kind == "embed":  # the corpus-embedding job, as under torchrun
            from training import embed

            embed.main(task["argv"])
        elif kind == "collectives":  # gathers, late imports, then the exit-time cleanup
            from training.distributed import cleanup, gather_no_grad, gather_with_grad

            for _ in range(int(task["rounds"])):
                gather_no_grad(torch.randn(256))
            gather_with_grad(torch.randn(4, 8, requires_grad=True)).sum().backward()
            import training.models  # noqa: F401  (timm, open_clip: they import torch.distributed.nn)

            cleanup()  # what atexit runs; the group's threads must end with it
            (out_dir / f"threads{info.rank}.json").write_text(json.dumps(thread_names()))
        elif kind == "encode_and_mine":
            arrays = encode_and_mine(task, info)
            if info.is_main:
                np.savez(out_dir / f"{name}.npz", **arrays)
        else:
            raise ValueError(f"unknown task kind {kind!r}")


def thread_names() -> list[str]:
    """The names of this process's threads (Linux): gloo's are ``gloo_*`` / ``pt_gloo_*``."""
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


def encode_and_mine(task: dict[str, Any], info: Any) -> dict[str, np.ndarray]:
    """Sharded corpus encoding (images with unreadable files, captions) with a tiny teacher and
    sharded mining over embeddings with exact ties, as ``dist_worker`` and the single-process
    reference both run it."""
    from training.data import load_karpathy
    from training.models import build_teacher, tokenize
    from training.stage2 import mine
    from training.train_utils import encode_image_files, encode_token_rows, seed_everything

    seed_everything(0)
    model = build_teacher(pretrained=None, tiny=True).to(info.device)
    corpus = load_karpathy(task["json"], task["root"], "train")
    images, valid = encode_image_files(
        model, corpus.images, int(model.image_size), int(task["batch_size"]), info
    )
    texts = encode_token_rows(model, tokenize(corpus.captions), int(task["batch_size"]), info)
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    base = rng.normal(size=(20, 16)).astype(np.float32)
    corpus_emb = np.concatenate([base, base, base[:5]])  # exact ties, broken by row
    groups = rng.integers(0, 12, size=len(corpus_emb))
    valid_rows = np.ones(len(corpus_emb), bool)
    valid_rows[[3, 30]] = False
    ids = mine(queries, corpus_emb, 7, rng.integers(0, 12, size=37), groups, valid_rows, info)
    return {"images": images, "valid": valid, "texts": texts, "mined": ids}
