"""Shared training machinery: configs, optimiser and schedule, RNG state, corpus encoding."""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from training.data import ImageFiles, collate_skipping, prepare_pixels
from training.distributed import DistInfo, all_sizes, gather_rows, shard_for_rank

log = logging.getLogger("training")


# --------------------------------------------------------------------------------------------
# Configs


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` overrides (value parsed as YAML) applied to a nested config."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = _parse_value(value)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML config; ``base: other.yaml`` or a list of them (relative to the file, later ones
    winning) is merged underneath."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    bases = config.pop("base", None)
    if bases is not None:
        merged: dict[str, Any] = {}
        for base in [bases] if isinstance(bases, str) else bases:
            merged = deep_merge(merged, load_config(path.parent / base))
        config = deep_merge(merged, config)
    return apply_overrides(config, overrides)


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def config_arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see training/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. train.lr=1e-4",
    )
    return parser


# --------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(
    params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW; as in CLIP / open_clip, gains, biases, embeddings' positions and the logit scale
    (1-d or scalar parameters) get no weight decay."""
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "positional_embedding" in name else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        eps=eps,
    )


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """L2 norm of the gradients (after DDP's all-reduce: the global batch's gradient), logged per
    step; it also shows a gradient-scale error that AdamW's normalised updates would hide."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0  # one sync


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps`` (the paper: 10,000 warm-up steps)."""
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scaled_warmup(configured: int, total_steps: int, max_fraction: float = 0.1) -> int:
    """The paper's 10,000 warm-up steps, capped at ``max_fraction`` of the run's steps so the
    learning rate always decays within the run (a short run, or Flickr30k's ~7,500 steps)."""
    if not 0.0 < max_fraction < 1.0:
        raise ValueError(
            f"train.warmup_max_fraction must be in (0, 1) so the learning rate "
            f"decays within the run, got {max_fraction}"
        )
    return int(min(configured, max(1, round(max_fraction * total_steps))))


@dataclass(frozen=True)
class Schedule:
    """The shape of a run: an epoch visits each item (stage 2: each caption) once, in
    ``steps_per_epoch`` global batches (the last partial batch is dropped); linear warm-up for
    ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    items: int
    global_batch: int
    steps_per_epoch: int
    epochs: int
    warmup_steps: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def plan_schedule(
    items: int, global_batch: int, epochs: int, warmup_steps: int, warmup_max_fraction: float
) -> Schedule:
    steps = items // global_batch
    if steps == 0:
        raise ValueError(
            f"{items} training items are fewer than one global batch of "
            f"{global_batch}; lower train.batch_size"
        )
    total = steps * int(epochs)
    return Schedule(
        items,
        global_batch,
        steps,
        int(epochs),
        scaled_warmup(int(warmup_steps), total, float(warmup_max_fraction)),
    )


# --------------------------------------------------------------------------------------------
# RNG state (exact resumption)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Encoding whole corpora (cached teacher embeddings, frozen sides, mining queries, evaluation)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    # bf16 needs no loss scaling; CPU runs stay in fp32.
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


@torch.no_grad()
def encode_image_files(
    model: nn.Module,
    paths: Sequence[Path],
    load_size: int,
    batch_size: int,
    info: DistInfo,
    num_workers: int = 0,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized float32 embeddings (n, d) of image files, and a bool mask of the images
    that could be read (unreadable ones get a zero row and False). Each rank encodes a
    batch-aligned 1/W of the files (the same batches one process runs), then all ranks gather
    the whole result."""
    share = shard_for_rank(len(paths), info, align=batch_size)
    dataset = ImageFiles(list(paths)[share], load_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping)
    was_training = model.training
    model.eval()
    local_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        if batch["size"] == 0:
            continue
        index, pixels = batch["columns"]
        with autocast(info.device, amp):
            emb = model.encode_image(prepare_pixels(model, pixels.to(info.device)))
        local_rows.append((index, torch.nn.functional.normalize(emb.float(), dim=-1).cpu()))
    model.train(was_training)
    dim = _agreed_dim(local_rows[0][1].shape[1] if local_rows else None, model, info)
    count = share.stop - share.start
    local = torch.zeros(count, dim)
    valid = torch.zeros(count, dtype=torch.bool)
    for index, emb in local_rows:
        local[index] = emb
        valid[index] = True
    return (
        gather_rows(local.numpy(), len(paths), info, batch_size),
        gather_rows(valid.numpy(), len(paths), info, batch_size),
    )


@torch.no_grad()
def encode_token_rows(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, info: DistInfo, amp: bool = False
) -> np.ndarray:
    """L2-normalized float32 text embeddings (n, d); each rank encodes a batch-aligned 1/W."""
    share = shard_for_rank(len(tokens), info, align=batch_size)
    was_training = model.training
    model.eval()
    out = []
    part = tokens[share]
    for start in range(0, len(part), batch_size):
        chunk = part[start : start + batch_size].to(info.device).long()
        with autocast(info.device, amp):
            emb = model.encode_text(chunk)
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    model.train(was_training)
    dim = _agreed_dim(out[0].shape[1] if out else None, model, info)
    local = torch.cat(out) if out else torch.zeros(0, dim)
    return gather_rows(local.numpy(), len(tokens), info, batch_size)


def _agreed_dim(dim: int | None, model: nn.Module, info: DistInfo) -> int:
    """The embedding width, also on a rank whose shard was empty (it learns it from the
    others)."""
    if info.enabled:
        dims = all_sizes(-1 if dim is None else dim, info)
        if max(dims) >= 0:
            return max(dims)
    return dim if dim is not None else _embedding_dim(model)


def _embedding_dim(model: nn.Module) -> int:
    config = getattr(model, "leanclip_config", {})
    if "embed_dim" in config:
        return int(config["embed_dim"])
    return int(config["open_clip_cfg"]["embed_dim"])


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (hex, 16 digits) of a model's weights: the key of caches computed with it, so a
    checkpoint retrained in place never reuses embeddings of its former weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel()
            else b""
        )
    return digest.hexdigest()[:16]


def load_size_for(*models: nn.Module) -> int:
    """Decode images once at the largest input size among the models (resized per model)."""
    return max(int(m.image_size) for m in models)
