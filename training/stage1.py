"""Stage 1 (paper section 3.2.1): intra-modal contrastive distillation on unpaired data.

    python -m training.stage1 --config training/configs/s6_stage1.yaml [--set train.lr=1e-4]
    python -m training.stage1 --config ... --stage1-loss mse          # Table 2 ablations
    torchrun --nproc_per_node 8 -m training.stage1 --config ...

Each step takes a global batch of images and one of texts (``train.batch_size``, split across
ranks; from separate collections); the student image tower learns eq. 2 against the frozen
teacher's image embeddings, the text tower eq. 3. Losses (``train.loss`` / ``--stage1-loss``):
``infonce`` (the paper), ``mse`` (ablation), ``intermodal`` (ablation: CLIP's InfoNCE between the
student tower and the teacher's other tower on paired data), ``clip`` (the paper's TinyBERT
baseline: CLIP's InfoNCE between the student's own two towers on paired data), ``none`` (skip
stage 1: save the initial student). Only the towers of ``train.modalities`` train (never the
logit scale, except with ``clip``), each wrapped in DDP on its own. The teacher's embeddings can
be precomputed once and cached on disk (float16 memmaps, ``train.cache_teacher``), keyed by a
hash of the teacher's weights.

A config with ``recipe: minilm_text`` is delegated to ``training.minilm_stage1.main``, one with
``recipe: minilm_seeds`` to ``training.stage1_seeds.run_grid``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training import losses
from training.data import (
    ImageFiles,
    PairedCorpus,
    PairedImages,
    WebDatasetImages,
    collate_skipping,
    epoch_pairs,
    epoch_permutation,
    expand_shards,
    list_images,
    load_paired,
    load_text_lines,
    prepare_pixels,
    read_webdataset_texts,
    resolve_webdataset,
)
from training.distributed import (
    BatchLayout,
    DistInfo,
    TowerForward,
    TrainableSides,
    all_counts,
    all_true,
    barrier,
    ddp,
    gather_with_grad,
    init_distributed,
    micro_slice,
)
from training.models import (
    build_student_from_settings,
    build_teacher,
    has_own_tokenizer,
    model_config,
    read_checkpoint,
    save_checkpoint,
    tokenize,
    tokenize_for,
    tower_parameters,
)
from training.train_utils import (
    autocast,
    config_arg_parser,
    cosine_with_warmup,
    encode_image_files,
    encode_token_rows,
    grad_norm,
    load_config,
    load_size_for,
    make_optimizer,
    model_fingerprint,
    plan_schedule,
    rng_state,
    seed_everything,
    set_rng_state,
)
from training.weights import configure as configure_weights

log = logging.getLogger("training.stage1")

LOSSES = ("infonce", "mse", "intermodal", "clip", "none")
PAIRED_LOSSES = ("intermodal", "clip")
# losses that never look at the teacher's embeddings: no cache pass over the data for them
TEACHER_FREE_LOSSES = ("clip", "none")

DEFAULT_TRAIN: dict[str, Any] = {
    "loss": "infonce",
    "modalities": ["image", "text"],
    "epochs": 1,
    "batch_size": 84,
    "max_rank_batch": None,
    "lr": 3e-4,
    "weight_decay": 0.1,
    "warmup_steps": 10000,
    "warmup_max_fraction": 0.5,
    "temperature": 0.05,
    "amp": True,
    "cache_teacher": True,
    "num_workers": 4,
    "checkpoint_every": 1000,
    "keep_checkpoints": False,
    "max_steps": None,
    "log_every": 50,
    "embed_batch_size": 256,
    "cache_dir": None,
}


def _image_collection(spec: Mapping[str, Any]) -> list[Path] | list[str]:
    """Image file paths, or (format webdataset) the list of shard files."""
    fmt = spec.get("format")
    if fmt == "webdataset":
        return expand_shards(spec["shards"])
    if fmt == "images":
        return list_images(spec["path"])
    return load_paired(spec).images


def _text_collection(spec: Mapping[str, Any]) -> list[str]:
    fmt = spec.get("format")
    if fmt == "lines":
        return load_text_lines(spec["path"])
    if fmt == "webdataset":
        return read_webdataset_texts(expand_shards(spec["shards"]))
    return load_paired(spec).captions


class Stage1Trainer:
    def __init__(self, config: Mapping[str, Any], info: DistInfo | None = None) -> None:
        self.config = dict(config)
        unknown = set(config.get("train", {})) - set(DEFAULT_TRAIN)
        if unknown:
            raise ValueError(
                f"unknown stage-1 train settings {sorted(unknown)}; known: {sorted(DEFAULT_TRAIN)}"
            )
        self.cfg = {**DEFAULT_TRAIN, **dict(config.get("train", {}))}
        if self.cfg["loss"] not in LOSSES:
            raise ValueError(f"train.loss must be one of {LOSSES}, got {self.cfg['loss']!r}")
        self.info = info or init_distributed(config.get("device"))
        self.run_dir = Path(config["run_dir"])
        if self.info.is_main:
            (self.run_dir / "cache").mkdir(parents=True, exist_ok=True)
        barrier()
        self.seed = int(config.get("seed", 0))
        seed_everything(self.seed)
        configure_weights(config)  # a config's weights_dir: every pretrained weight from that folder
        m = dict(config.get("model", {}))
        tiny = bool(m.get("tiny", False))
        self.teacher = build_teacher(
            m.get("teacher_name", "ViT-B-32"), m.get("teacher_pretrained", "openai"), tiny=tiny
        )
        self.teacher.eval().requires_grad_(False)  # frozen, eval mode (paper: teacher fixed)
        self.student = build_student_from_settings(m, self.teacher, tiny=tiny)
        self.teacher.to(self.info.device)
        self.student.to(self.info.device).train()
        self.modalities = list(self.cfg["modalities"])
        # a webdataset index (training.prepare) gives the shards and the real sample count
        data = {
            k: resolve_webdataset(v) if isinstance(v, Mapping) else v
            for k, v in config.get("data", {}).items()
        }
        self.config["data"] = data
        self.paired: PairedCorpus | None = None
        self.images: list[Any] = []
        self.texts: list[str] = []
        self.webdataset = False
        if self.cfg["loss"] in PAIRED_LOSSES:
            if "paired" not in data:
                raise ValueError(f"the {self.cfg['loss']} stage-1 loss needs data.paired (image-text pairs)")
            self.paired = load_paired(data["paired"])
        else:
            if "image" in self.modalities:
                if "images" not in data:
                    raise ValueError("stage 1 on images needs data.images")
                self.webdataset = data["images"].get("format") == "webdataset"
                self.images = _image_collection(data["images"])
            if "text" in self.modalities:
                if "texts" not in data:
                    raise ValueError("stage 1 on texts needs data.texts")
                self.texts = _text_collection(data["texts"])
        self.load_size = load_size_for(self.teacher, self.student)
        self.amp = bool(self.cfg["amp"]) and self.info.device.type == "cuda"
        # int32 halves the memory of millions of tokenized captions; cast per batch
        texts = self.paired.captions if self.paired else self.texts
        self.tokens = (
            tokenize_for(self.student, texts).to(torch.int32)
            if (self.paired or self.texts)
            else torch.zeros(0, 77, dtype=torch.int32)
        )
        # a student with its own tokenizer (HF text tower): the teacher keeps CLIP's tokens
        self.teacher_tokens = (
            tokenize(texts, int(self.teacher.context_length)).to(torch.int32)
            if has_own_tokenizer(self.student) and len(texts)
            else self.tokens
        )
        self.layout = BatchLayout(
            int(self.cfg["batch_size"]), self.info.world_size, self.cfg["max_rank_batch"]
        )
        self._set_trainable()
        self.teacher_image_cache: np.ndarray | None = None
        self.teacher_text_cache: np.ndarray | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.skipped_images = 0
        self.skipped_steps = 0

    def _set_trainable(self) -> None:
        """Stage 1 trains the towers of ``train.modalities`` and nothing else (the logit scale
        only with the ``clip`` loss, which trains both towers against each other)."""
        if self.cfg["loss"] == "clip":
            self.student.requires_grad_(True)
            return
        trained = {n for side in self.modalities for n in tower_parameters(self.student, side)}
        for name, p in self.student.named_parameters():
            p.requires_grad_(name in trained)

    def _pairs(self, epoch: int) -> np.ndarray:
        assert self.paired is not None
        return epoch_pairs(self.paired, self.seed, 2, epoch)

    # ------------------------------------------------------------ sizes
    def n_images(self) -> int:
        if self.paired is not None:
            return len(self.paired)
        if self.webdataset:
            return int(self.config["data"]["images"].get("num_samples", 0)) or 0
        return len(self.images)

    def epoch_items(self) -> int:
        """What one epoch visits once: every caption of a paired corpus, else the larger of the
        image and text collections (the smaller one wraps around)."""
        if self.paired is not None:
            return len(self.paired.captions)
        counts = []
        if "image" in self.modalities:
            counts.append(self.n_images())
        if "text" in self.modalities:
            counts.append(len(self.texts))
        return max(counts) if counts else 0

    def schedule(self):
        if self.webdataset and self.n_images() == 0 and "image" in self.modalities:
            raise ValueError("for webdataset images set data.images.num_samples")
        return plan_schedule(
            self.epoch_items(),
            self.layout.global_batch,
            int(self.cfg["epochs"]),
            int(self.cfg["warmup_steps"]),
            float(self.cfg["warmup_max_fraction"]),
        )

    def steps_per_epoch(self) -> int:
        return self.schedule().steps_per_epoch

    # ------------------------------------------------------------ teacher cache
    def _cache_key(self, what: str, count: int) -> Path:
        fingerprint = hashlib.sha256(
            json.dumps(
                [
                    model_config(self.teacher),
                    what,
                    count,
                    model_fingerprint(self.teacher),
                    self.config.get("data", {}),
                    self.cfg["loss"],
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:12]
        root = Path(self.cfg.get("cache_dir") or self.run_dir / "cache")
        return root / f"teacher_{what}_{fingerprint}.npy"

    def _memmap_cache(self, what: str, compute: Any, count: int) -> np.ndarray:
        path = self._cache_key(what, count)
        if not all_true(path.is_file(), self.info):
            array = compute()
            if self.info.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, array.astype(np.float16))
                tmp.replace(path)
            barrier()
        return np.load(path, mmap_mode="r")

    def prepare_cache(self) -> None:
        if not self.cfg["cache_teacher"] or self.webdataset or self.cfg["loss"] in TEACHER_FREE_LOSSES:
            return
        bs = int(self.cfg["embed_batch_size"])
        paths = self.paired.images if self.paired is not None else self.images
        if paths and (self.paired is not None or "image" in self.modalities):

            def images() -> np.ndarray:
                emb, valid = encode_image_files(
                    self.teacher, paths, self.load_size, bs, self.info, int(self.cfg["num_workers"]), self.amp
                )
                emb[~valid] = np.nan  # unreadable: skipped again by the loader
                return emb

            self.teacher_image_cache = self._memmap_cache("images", images, len(paths))
        if len(self.tokens) and (self.paired is not None or "text" in self.modalities):
            self.teacher_text_cache = self._memmap_cache(
                "texts",
                lambda: encode_token_rows(self.teacher, self.teacher_tokens, bs, self.info, self.amp),
                len(self.tokens),
            )

    # ------------------------------------------------------------ data
    def _image_batches(self, epoch: int, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """This rank's share of each step's global batch of images, one batch per step (fewer
        rows where images were unreadable)."""
        local = self.layout.rank_batch(self.info.rank)
        workers = int(self.cfg["num_workers"])
        if self.webdataset:
            stream = WebDatasetImages(
                self.images,
                self.load_size,
                skip=start * self.layout.global_batch,
                global_batch=self.layout.global_batch,
                share=self.layout.share(self.info.rank),
            )
            loader = DataLoader(stream, batch_size=local, collate_fn=collate_skipping, num_workers=workers)
            while True:  # cycle through the shards
                for batch in loader:
                    yield batch
                stream.skip = 0
        positions = self.layout.rows(self.info.rank, start, stop)
        if self.paired is not None:
            pairs = self._pairs(epoch)
            dataset = PairedImages(self.paired, self.load_size)
            dataset.set_pairs(pairs[positions % len(pairs)])
            rows = None
        else:
            order = epoch_permutation(self.n_images(), self.seed, 1, epoch)
            rows = order[positions % len(order)]
            dataset = ImageFiles([self.images[i] for i in rows], self.load_size)
        loader = DataLoader(
            dataset, batch_size=local, shuffle=False, collate_fn=collate_skipping, num_workers=workers
        )
        for batch in loader:
            if rows is not None and batch["size"]:
                position, pixels = batch["columns"]
                batch["columns"] = [torch.as_tensor(rows[position.numpy()]), pixels]
            yield batch

    def _text_rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        order = epoch_permutation(len(self.texts), self.seed, 3, epoch)
        return order[self.layout.rows(self.info.rank, start, stop) % len(order)]

    # ------------------------------------------------------------ loss
    def _teacher_images(self, index: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        if self.teacher_image_cache is not None:
            return torch.from_numpy(np.asarray(self.teacher_image_cache[index.numpy()], np.float32)).to(
                self.info.device
            )
        with torch.no_grad(), autocast(self.info.device, self.amp):
            return self.teacher.encode_image(prepare_pixels(self.teacher, pixels)).float()

    def _teacher_texts(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.teacher_text_cache is not None:
            return torch.from_numpy(np.asarray(self.teacher_text_cache[rows.numpy()], np.float32)).to(
                self.info.device
            )
        with torch.no_grad(), autocast(self.info.device, self.amp):
            return self.teacher.encode_text(tokens).float()

    def _distill(self, student: torch.Tensor, teacher: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        s = gather_with_grad(student.float(), sizes)
        t = gather_with_grad(teacher.float(), sizes)
        if self.cfg["loss"] == "mse":
            return losses.embedding_mse(s, t)
        return losses.intra_modal_infonce(s, t, float(self.cfg["temperature"]))

    def _towers(self) -> dict[str, nn.Module]:
        """What DDP wraps: each trained tower on its own (so a step never leaves a wrapped
        parameter without a gradient), or, for the ``clip`` loss, both towers and the logit
        scale."""
        if self.cfg["loss"] == "clip":
            return {"pair": ddp(TrainableSides(self.student), self.info)}
        return {
            side: ddp(TowerForward(self.student, side, tower_parameters(self.student, side)), self.info)
            for side in self.modalities
        }

    def _step_loss(
        self,
        towers: Mapping[str, nn.Module],
        image_cols: list[Any] | None,
        image_sizes: list[int],
        text_rows: np.ndarray | None,
        text_sizes: list[int],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.info.device
        parts: dict[str, float] = {}
        loss = torch.zeros((), device=device)
        if self.cfg["loss"] in PAIRED_LOSSES:
            assert image_cols is not None
            image_index, pixels, caption_index = image_cols
            tokens = self.tokens[caption_index].to(device).long()
            pixels = pixels.to(device)
            student_pixels = prepare_pixels(self.student, pixels)
            if self.cfg["loss"] == "clip":  # the paper's TinyBERT baseline: towers vs each other
                with autocast(device, self.amp):
                    s_img, s_txt, scale = towers["pair"](student_pixels, tokens)
                t2v, v2t = losses.clip_loss(
                    gather_with_grad(s_img.float(), image_sizes),
                    gather_with_grad(s_txt.float(), image_sizes),
                    scale,
                )
                parts["clip"] = float((t2v + v2t).detach())
                return t2v + v2t, parts
            scale = self.teacher.logit_scale
            if "image" in self.modalities:
                with autocast(device, self.amp):
                    s_img = towers["image"](student_pixels)
                t_txt = self._teacher_texts(
                    caption_index, self.teacher_tokens[caption_index].to(device).long()
                )
                t2v, v2t = losses.clip_loss(
                    gather_with_grad(s_img.float(), image_sizes), gather_with_grad(t_txt, image_sizes), scale
                )
                parts["image_intermodal"] = float((t2v + v2t).detach())
                loss = loss + t2v + v2t
            if "text" in self.modalities:
                with autocast(device, self.amp):
                    s_txt = towers["text"](tokens)
                t_img = self._teacher_images(image_index, pixels)
                t2v, v2t = losses.clip_loss(
                    gather_with_grad(t_img, image_sizes), gather_with_grad(s_txt.float(), image_sizes), scale
                )
                parts["text_intermodal"] = float((t2v + v2t).detach())
                loss = loss + t2v + v2t
            return loss, parts
        if image_cols is not None:
            index, pixels = image_cols[:2]
            pixels = pixels.to(device)
            with autocast(device, self.amp):
                s_img = towers["image"](prepare_pixels(self.student, pixels))
            l_img = self._distill(s_img, self._teacher_images(index, pixels), image_sizes)
            parts["image"] = float(l_img.detach())
            loss = loss + l_img
        if text_rows is not None:
            rows = torch.as_tensor(text_rows)
            with autocast(device, self.amp):
                s_txt = towers["text"](self.tokens[rows].to(device).long())
            l_txt = self._distill(
                s_txt, self._teacher_texts(rows, self.teacher_tokens[rows].to(device).long()), text_sizes
            )
            parts["text"] = float(l_txt.detach())
            loss = loss + l_txt
        return loss, parts

    def _accumulate(
        self,
        towers: Mapping[str, nn.Module],
        image_batch: dict[str, Any] | None,
        image_sizes: list[int],
        text_rows: np.ndarray | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Backward over ``grad_accum`` micro-batches (each with its own in-batch negatives,
        gathered across ranks); DDP synchronises gradients on the last one only."""
        accum = self.layout.grad_accum
        text_sizes = self.layout.sizes
        total = torch.zeros((), device=self.info.device)
        parts: dict[str, float] = {}
        for m in range(accum):

            def sizes_of(all_sizes: list[int]) -> list[int]:
                return [micro_slice(m, accum, n).stop - micro_slice(m, accum, n).start for n in all_sizes]

            micro_images = None
            if image_batch is not None:
                sl = micro_slice(m, accum, image_batch["size"])
                micro_images = [c[sl] for c in image_batch["columns"]]
            micro_rows = text_rows[micro_slice(m, accum, len(text_rows))] if text_rows is not None else None
            last = m == accum - 1
            with contextlib.ExitStack() as stack:
                if self.info.enabled and not last:
                    for tower in towers.values():
                        stack.enter_context(tower.no_sync())
                loss, micro_parts = self._step_loss(
                    towers, micro_images, sizes_of(image_sizes), micro_rows, sizes_of(text_sizes)
                )
                (loss / accum).backward()
            total = total + loss.detach() / accum
            for key, value in micro_parts.items():
                parts[key] = parts.get(key, 0.0) + value / accum
        return total, parts

    # ------------------------------------------------------------ loop
    def _save(
        self, name: str, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, step_in_epoch: int
    ) -> None:
        if self.info.is_main:
            save_checkpoint(
                self.run_dir / name,
                self.student,
                {
                    "stage": 1,
                    "config": self.config,
                    "train_state": {
                        "epoch": epoch,
                        "step_in_epoch": step_in_epoch,
                        "global_step": self.step,
                        "history": self.history,
                        "skipped_images": self.skipped_images,
                        "skipped_steps": self.skipped_steps,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                    },
                },
            )
        barrier()

    def _resume(
        self, resume: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> tuple[int, int]:
        """Load a stage-1 training checkpoint into the student, optimizer, scheduler, RNGs and
        counters; returns the (epoch, step in epoch) to go on from."""
        payload = read_checkpoint(resume)
        if payload.get("stage") != 1:
            raise ValueError(f"{resume} is not a stage-1 training checkpoint")
        self.student.load_state_dict(payload["state_dict"])
        ts = payload["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        set_rng_state(ts["rng"])
        self.step, self.history = ts["global_step"], ts["history"]
        self.skipped_images = ts["skipped_images"]
        self.skipped_steps = ts.get("skipped_steps", 0)
        return ts["epoch"], ts["step_in_epoch"]

    def _train_step(
        self,
        towers: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        image_batch: dict[str, Any] | None,
        rows: Any,
        step: int,
    ) -> tuple[torch.Tensor | None, dict[str, Any], list[int]]:
        """One optimizer step on this rank's batch: (loss, loss parts, every rank's image batch
        size). The loss is None when the step is skipped on every rank."""
        image_sizes: list[int] = []
        if image_batch is not None:
            # every rank learns every rank's batch size: gathers use them, and a step
            # in which some rank has too few readable images is skipped by all ranks
            counts = all_counts([image_batch["size"], image_batch["skipped"]], self.info)
            image_sizes = [int(c[0]) for c in counts]
            self.skipped_images += int(sum(c[1] for c in counts))
            if min(image_sizes) < self.layout.grad_accum:
                self.skipped_steps += 1
                log.warning("step %d skipped on every rank: readable images per rank %s", step, image_sizes)
                return None, {}, image_sizes
        optimizer.zero_grad(set_to_none=True)
        loss, parts = self._accumulate(towers, image_batch, image_sizes, rows)
        parts["grad_norm"] = grad_norm(self.student.parameters())
        optimizer.step()
        if self.cfg["loss"] == "clip":
            with torch.no_grad():  # CLIP clamps the learned temperature at 1/100
                self.student.logit_scale.clamp_(0, math.log(100))
        return loss, parts, image_sizes

    def run(self, resume: str | Path | None = None) -> list[dict[str, Any]]:
        if self.cfg["loss"] == "none":  # "w/o stage-1" kept as a checkpoint for stage 2
            if self.info.is_main:
                save_checkpoint(self.run_dir / "final.pt", self.student, {"stage": 1, "config": self.config})
            barrier()
            return []
        self.prepare_cache()
        schedule = self.schedule()
        steps, epochs = schedule.steps_per_epoch, schedule.epochs
        optimizer = make_optimizer(
            self.student.named_parameters(), float(self.cfg["lr"]), float(self.cfg["weight_decay"])
        )
        scheduler = cosine_with_warmup(optimizer, schedule.warmup_steps, schedule.total_steps)
        if self.info.is_main:
            plan = {"steps_per_epoch": steps, "epochs": epochs, "warmup_steps": schedule.warmup_steps}
            log.info(json.dumps({"stage": 1, **self.layout.describe(), **plan}))
        start_epoch, start_step = self._resume(resume, optimizer, scheduler) if resume else (0, 0)
        towers = self._towers()
        max_steps = self.cfg["max_steps"]
        uses_images = self.paired is not None or "image" in self.modalities
        uses_texts = self.paired is None and "text" in self.modalities
        local_texts = self.layout.rank_batch(self.info.rank)
        for epoch in range(start_epoch, epochs):
            stop = steps if max_steps is None else min(steps, start_step + int(max_steps))
            images = self._image_batches(epoch, start_step, stop) if uses_images else None
            text_rows = self._text_rows(epoch, start_step, stop) if uses_texts else None
            for i, step in enumerate(range(start_step, stop)):
                t0 = time.perf_counter()
                image_batch = next(images) if images is not None else None
                rows = text_rows[i * local_texts : (i + 1) * local_texts] if text_rows is not None else None
                loss, parts, image_sizes = self._train_step(towers, optimizer, image_batch, rows, step)
                scheduler.step()  # the schedule follows the position in the epoch
                self.step += 1
                if loss is not None:
                    record = {
                        "epoch": epoch,
                        "step": step,
                        "global_step": self.step,
                        "loss": float(loss.detach()),
                        "lr": scheduler.get_last_lr()[0],
                        "batch": sum(image_sizes) if image_sizes else self.layout.global_batch,
                        "seconds": time.perf_counter() - t0,
                        **parts,
                    }
                    self.history.append(record)
                    if self.info.is_main and step % int(self.cfg["log_every"]) == 0:
                        log.info(json.dumps(record))
                every = int(self.cfg["checkpoint_every"])
                if every and self.step % every == 0:
                    self._save("latest.pt", optimizer, scheduler, epoch, step + 1)
                    if self.cfg["keep_checkpoints"]:
                        self._save(f"step{self.step}.pt", optimizer, scheduler, epoch, step + 1)
            if max_steps is not None and stop < steps:
                self._save("latest.pt", optimizer, scheduler, epoch, stop)
                return self.history
            start_step = 0
        self._save("latest.pt", optimizer, scheduler, epochs, 0)
        if self.info.is_main:
            save_checkpoint(self.run_dir / "final.pt", self.student, {"stage": 1, "config": self.config})
        barrier()
        return self.history


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_arg_parser("Stage 1: intra-modal contrastive distillation")
    parser.add_argument("--resume", help="a latest.pt / stepN.pt checkpoint of this run")
    parser.add_argument(
        "--stage1-loss",
        choices=LOSSES,
        help="infonce (paper), mse, intermodal (ablations), clip (the paper's "
        "TinyBERT baseline), none (skip)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.overrides)
    if config.get("recipe") == "minilm_text":
        from training import minilm_stage1  # the starter engineer's text-only recipe

        return int(minilm_stage1.main(config) or 0)
    if config.get("recipe") == "minilm_seeds":  # the seeded grid (issue 30)
        from training import stage1_seeds

        stage1_seeds.run_grid(config)
        return 0
    if args.stage1_loss:
        config.setdefault("train", {})["loss"] = args.stage1_loss
    trainer = Stage1Trainer(config)
    history = trainer.run(resume=args.resume)
    if trainer.info.is_main:
        print(
            json.dumps(
                {
                    "steps": trainer.step,
                    "skipped_images": trainer.skipped_images,
                    "last_loss": history[-1]["loss"] if history else None,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
