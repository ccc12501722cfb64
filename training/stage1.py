"""Stage 1 (paper section 3.2.1): intra-modal contrastive distillation on unpaired data.

    python -m training.stage1 --config training/configs/s6_stage1.yaml [--set train.lr=1e-4]
    python -m training.stage1 --config ... --stage1-loss mse          # Table 2 ablations
    torchrun --nproc_per_node 8 -m training.stage1 --config ...

Each step takes a batch of images and a batch of texts (from separate collections); the student
image tower learns eq. 2 against the frozen teacher's image embeddings, the text tower eq. 3.
Losses (``train.loss`` / ``--stage1-loss``): ``infonce`` (the paper), ``mse`` (ablation),
``intermodal`` (ablation: CLIP's InfoNCE between the student tower and the teacher's other tower
on paired data), ``none`` (skip stage 1: save the initial student). The teacher's embeddings can
be precomputed once and cached on disk (float16 memmaps, ``train.cache_teacher``).

A config with ``recipe: minilm_text`` is delegated to ``training.minilm_stage1.main``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training import losses
from training.data import (ImageFiles, PairedCorpus, PairedImages, WebDatasetImages,
                           collate_skipping, epoch_permutation, expand_shards, list_images,
                           load_paired, load_text_lines, prepare_pixels, read_webdataset_texts)
from training.distributed import DistInfo, barrier, gather_with_grad, init_distributed
from training.models import (build_student_from_settings, build_teacher, has_own_tokenizer,
                             model_config, read_checkpoint, save_checkpoint, tokenize,
                             tokenize_for)
from training.train_utils import (autocast, config_arg_parser, cosine_with_warmup,
                                  encode_image_files, encode_token_rows, load_config,
                                  load_size_for, make_optimizer, rng_state, scaled_warmup,
                                  seed_everything, set_rng_state)

log = logging.getLogger("training.stage1")

LOSSES = ("infonce", "mse", "intermodal", "none")

DEFAULT_TRAIN: dict[str, Any] = {
    "loss": "infonce", "modalities": ["image", "text"], "epochs": 1, "batch_size": 84,
    "grad_accum": 1, "lr": 3e-4, "weight_decay": 0.1, "warmup_steps": 10000,
    "warmup_max_fraction": 0.1, "temperature": 0.05, "amp": True, "cache_teacher": True,
    "num_workers": 4, "checkpoint_every": 1000, "keep_checkpoints": False, "max_steps": None,
    "log_every": 50, "embed_batch_size": 256, "cache_dir": None,
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
            raise ValueError(f"unknown stage-1 train settings {sorted(unknown)}; "
                             f"known: {sorted(DEFAULT_TRAIN)}")
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
        m = dict(config.get("model", {}))
        tiny = bool(m.get("tiny", False))
        self.teacher = build_teacher(m.get("teacher_name", "ViT-B-32"),
                                     m.get("teacher_pretrained", "openai"), tiny=tiny)
        self.teacher.eval().requires_grad_(False)  # frozen, eval mode (paper: teacher fixed)
        self.student = build_student_from_settings(m, self.teacher, tiny=tiny)
        self.teacher.to(self.info.device)
        self.student.to(self.info.device).train()
        self.modalities = list(self.cfg["modalities"])
        data = config.get("data", {})
        self.paired: PairedCorpus | None = None
        self.images: list[Any] = []
        self.texts: list[str] = []
        self.webdataset = False
        if self.cfg["loss"] == "intermodal":
            if "paired" not in data:
                raise ValueError("the intermodal stage-1 loss needs data.paired (image-text pairs)")
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
        self.tokens = tokenize_for(self.student, texts).to(torch.int32) if (
            self.paired or self.texts) else torch.zeros(0, 77, dtype=torch.int32)
        # a student with its own tokenizer (HF text tower): the teacher keeps CLIP's tokens
        self.teacher_tokens = tokenize(texts, int(self.teacher.context_length)).to(
            torch.int32) if has_own_tokenizer(self.student) and len(texts) else self.tokens
        self.teacher_image_cache: np.ndarray | None = None
        self.teacher_text_cache: np.ndarray | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.skipped_images = 0

    # ------------------------------------------------------------ sizes
    def n_images(self) -> int:
        if self.paired is not None:
            return len(self.paired)
        if self.webdataset:
            return int(self.config["data"]["images"].get("num_samples", 0)) or 0
        return len(self.images)

    def steps_per_epoch(self) -> int:
        bs = int(self.cfg["batch_size"]) * self.info.world_size
        counts = []
        if self.paired is not None or "image" in self.modalities:
            counts.append(self.n_images() // bs)
        if self.paired is None and "text" in self.modalities:
            counts.append(len(self.texts) // bs)
        steps = max(counts) if counts else 0
        if steps == 0:
            raise ValueError(f"stage-1 collections are smaller than one global batch ({bs}); "
                             "for webdataset images set data.images.num_samples")
        return steps

    # ------------------------------------------------------------ teacher cache
    def _cache_key(self, what: str, count: int) -> Path:
        fingerprint = hashlib.sha256(json.dumps(
            [model_config(self.teacher), what, count,
             self.config.get("model", {}).get("teacher_pretrained"),
             self.config.get("data", {}), self.cfg["loss"]], sort_keys=True,
            default=str).encode()).hexdigest()[:12]
        root = Path(self.cfg.get("cache_dir") or self.run_dir / "cache")
        return root / f"teacher_{what}_{fingerprint}.npy"

    def _memmap_cache(self, what: str, compute: Any, count: int) -> np.ndarray:
        path = self._cache_key(what, count)
        if not path.is_file():
            array = compute()
            if self.info.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, array.astype(np.float16))
                tmp.replace(path)
            barrier()
        return np.load(path, mmap_mode="r")

    def prepare_cache(self) -> None:
        if not self.cfg["cache_teacher"] or self.webdataset or self.cfg["loss"] == "none":
            return
        bs = int(self.cfg["embed_batch_size"])
        paths = self.paired.images if self.paired is not None else self.images
        if paths and (self.paired is not None or "image" in self.modalities):
            def images() -> np.ndarray:
                emb, valid = encode_image_files(self.teacher, paths, self.load_size, bs,
                                                self.info, int(self.cfg["num_workers"]), self.amp)
                emb[~valid] = np.nan  # unreadable: skipped again by the loader
                return emb
            self.teacher_image_cache = self._memmap_cache("images", images, len(paths))
        if len(self.tokens) and (self.paired is not None or "text" in self.modalities):
            self.teacher_text_cache = self._memmap_cache(
                "texts", lambda: encode_token_rows(self.teacher, self.teacher_tokens, bs,
                                                   self.info, self.amp), len(self.tokens))

    # ------------------------------------------------------------ data
    def _local_rows(self, order: np.ndarray, start: int, stop: int) -> np.ndarray:
        bs = int(self.cfg["batch_size"])
        gb = bs * self.info.world_size
        n = len(order)
        rows = [order[(s * gb + self.info.rank * bs + np.arange(bs)) % n]
                for s in range(start, stop)]
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def _image_batches(self, epoch: int, start: int, stop: int) -> Iterator[dict[str, Any]]:
        bs = int(self.cfg["batch_size"])
        workers = int(self.cfg["num_workers"])
        if self.webdataset:
            skip = start * bs * self.info.world_size
            stream = WebDatasetImages(self.images, self.load_size, skip=skip,
                                      rank=self.info.rank, world_size=self.info.world_size)
            loader = DataLoader(stream, batch_size=bs, collate_fn=collate_skipping,
                                num_workers=workers)
            while True:  # cycle through the shards
                for batch in loader:
                    yield batch
                stream.skip = 0
        n = self.n_images()
        order = epoch_permutation(n, self.seed, 1, epoch)
        rows = self._local_rows(order, start, stop)
        if self.paired is not None:
            dataset = PairedImages(self.paired, self.load_size)
            caption_rng = np.random.default_rng([self.seed, 2, epoch])
            captions = np.array([c[caption_rng.integers(len(c))]
                                 for c in self.paired.image_captions])
            dataset.set_pairs(np.stack([rows, captions[rows]], axis=1))
        else:
            dataset = ImageFiles([self.images[i] for i in rows], self.load_size)
        loader = DataLoader(dataset, batch_size=bs, shuffle=False, collate_fn=collate_skipping,
                            num_workers=workers)
        for batch in loader:
            if self.paired is None and batch["size"]:
                position, pixels = batch["columns"]
                batch["columns"] = [torch.as_tensor(rows[position.numpy()]), pixels]
            yield batch

    def _text_rows(self, epoch: int, start: int, stop: int) -> np.ndarray:
        order = epoch_permutation(len(self.texts), self.seed, 3, epoch)
        return self._local_rows(order, start, stop)

    # ------------------------------------------------------------ loss
    def _teacher_images(self, index: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        if self.teacher_image_cache is not None:
            return torch.from_numpy(np.asarray(self.teacher_image_cache[index.numpy()],
                                               np.float32)).to(self.info.device)
        with torch.no_grad(), autocast(self.info.device, self.amp):
            return self.teacher.encode_image(prepare_pixels(self.teacher, pixels)).float()

    def _teacher_texts(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.teacher_text_cache is not None:
            return torch.from_numpy(np.asarray(self.teacher_text_cache[rows.numpy()],
                                               np.float32)).to(self.info.device)
        with torch.no_grad(), autocast(self.info.device, self.amp):
            return self.teacher.encode_text(tokens).float()

    def _distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = gather_with_grad(student.float()), gather_with_grad(teacher.float())
        if self.cfg["loss"] == "mse":
            return losses.embedding_mse(s, t)
        return losses.intra_modal_infonce(s, t, float(self.cfg["temperature"]))

    def _step_loss(self, forward: nn.Module, image_batch: dict[str, Any] | None,
                   text_rows: np.ndarray | None) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.info.device
        parts: dict[str, float] = {}
        loss = torch.zeros((), device=device)
        scale = self.teacher.logit_scale
        if self.cfg["loss"] == "intermodal":
            image_index, pixels, caption_index = image_batch["columns"]
            tokens = self.tokens[caption_index].to(device).long()
            pixels = pixels.to(device)
            with autocast(device, self.amp):
                s_img, s_txt = forward(prepare_pixels(self.student, pixels), tokens)
            if "image" in self.modalities:
                t_txt = self._teacher_texts(caption_index,
                                            self.teacher_tokens[caption_index].to(device).long())
                t2v, v2t = losses.clip_loss(gather_with_grad(s_img.float()),
                                            gather_with_grad(t_txt), scale)
                parts["image_intermodal"] = float((t2v + v2t).detach())
                loss = loss + t2v + v2t
            if "text" in self.modalities:
                t_img = self._teacher_images(image_index, pixels)
                t2v, v2t = losses.clip_loss(gather_with_grad(t_img),
                                            gather_with_grad(s_txt.float()), scale)
                parts["text_intermodal"] = float((t2v + v2t).detach())
                loss = loss + t2v + v2t
            return loss, parts
        pixels = tokens = None
        if image_batch is not None:
            index, pixels = image_batch["columns"][:2]
            pixels = pixels.to(device)
        if text_rows is not None:
            tokens = self.tokens[torch.as_tensor(text_rows)].to(device).long()
        with autocast(device, self.amp):
            s_img, s_txt = forward(prepare_pixels(self.student, pixels)
                                   if pixels is not None else None, tokens)
        if s_img is not None:
            l_img = self._distill(s_img, self._teacher_images(index, pixels))
            parts["image"] = float((l_img).detach())
            loss = loss + l_img
        if s_txt is not None:
            rows = torch.as_tensor(text_rows)
            l_txt = self._distill(s_txt, self._teacher_texts(
                rows, self.teacher_tokens[rows].to(device).long()))
            parts["text"] = float((l_txt).detach())
            loss = loss + l_txt
        return loss, parts

    def _accumulate(self, forward: nn.Module, image_batch: dict[str, Any] | None,
                    text_rows: np.ndarray | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Backward over ``grad_accum`` micro-batches (each with its own in-batch negatives);
        DDP synchronises gradients on the last one only."""
        accum = int(self.cfg["grad_accum"])
        total = torch.zeros((), device=self.info.device)
        parts: dict[str, float] = {}
        for m in range(accum):
            def part(n: int) -> slice:
                return slice(m * n // accum, (m + 1) * n // accum)

            micro_images = None
            if image_batch is not None:
                sl = part(image_batch["size"])
                micro_images = {**image_batch, "columns": [c[sl] for c in image_batch["columns"]]}
            micro_rows = text_rows[part(len(text_rows))] if text_rows is not None else None
            last = m == accum - 1
            context = (forward.no_sync() if self.info.enabled and not last
                       else contextlib.nullcontext())
            with context:
                loss, micro_parts = self._step_loss(forward, micro_images, micro_rows)
                (loss / accum).backward()
            total = total + loss.detach() / accum
            for key, value in micro_parts.items():
                parts[key] = parts.get(key, 0.0) + value / accum
        return total, parts

    # ------------------------------------------------------------ loop
    def _save(self, name: str, optimizer: torch.optim.Optimizer, scheduler: Any,
              epoch: int, step_in_epoch: int) -> None:
        if self.info.is_main:
            save_checkpoint(self.run_dir / name, self.student, {
                "stage": 1, "config": self.config,
                "train_state": {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                "global_step": self.step, "history": self.history,
                                "skipped_images": self.skipped_images,
                                "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "rng": rng_state()}})
        barrier()

    def run(self, resume: str | Path | None = None) -> list[dict[str, Any]]:
        if self.cfg["loss"] == "none":  # "w/o stage-1" kept as a checkpoint for stage 2
            if self.info.is_main:
                save_checkpoint(self.run_dir / "final.pt", self.student,
                                {"stage": 1, "config": self.config})
            barrier()
            return []
        self.prepare_cache()
        steps = self.steps_per_epoch()
        epochs = int(self.cfg["epochs"])
        total = steps * epochs
        optimizer = make_optimizer(self.student.named_parameters(), float(self.cfg["lr"]),
                                   float(self.cfg["weight_decay"]))
        scheduler = cosine_with_warmup(optimizer, scaled_warmup(
            int(self.cfg["warmup_steps"]), total, float(self.cfg["warmup_max_fraction"])), total)
        start_epoch, start_step = 0, 0
        if resume:
            payload = read_checkpoint(resume)
            if payload.get("stage") != 1:
                raise ValueError(f"{resume} is not a stage-1 training checkpoint")
            self.student.load_state_dict(payload["state_dict"])
            ts = payload["train_state"]
            optimizer.load_state_dict(ts["optimizer"])
            scheduler.load_state_dict(ts["scheduler"])
            set_rng_state(ts["rng"])
            start_epoch, start_step = ts["epoch"], ts["step_in_epoch"]
            self.step, self.history = ts["global_step"], ts["history"]
            self.skipped_images = ts["skipped_images"]
        forward: nn.Module = _StudentForward(self.student)
        if self.info.enabled:
            forward = nn.parallel.DistributedDataParallel(
                forward, device_ids=[self.info.local_rank] if self.info.device.type == "cuda"
                else None)
        max_steps = self.cfg["max_steps"]
        uses_images = self.paired is not None or "image" in self.modalities
        uses_texts = self.paired is None and "text" in self.modalities
        for epoch in range(start_epoch, epochs):
            stop = steps if max_steps is None else min(steps, start_step + int(max_steps))
            images = self._image_batches(epoch, start_step, stop) if uses_images else None
            text_rows = self._text_rows(epoch, start_step, stop) if uses_texts else None
            bs = int(self.cfg["batch_size"])
            for i, step in enumerate(range(start_step, stop)):
                t0 = time.perf_counter()
                image_batch = next(images) if images is not None else None
                if image_batch is not None:
                    self.skipped_images += int(image_batch["skipped"])
                    if image_batch["size"] == 0:
                        continue
                rows = text_rows[i * bs:(i + 1) * bs] if text_rows is not None else None
                optimizer.zero_grad(set_to_none=True)
                loss, parts = self._accumulate(forward, image_batch, rows)
                optimizer.step()
                scheduler.step()
                self.step += 1
                record = {"epoch": epoch, "step": step, "global_step": self.step,
                          "loss": float((loss).detach()), "lr": scheduler.get_last_lr()[0],
                          "seconds": time.perf_counter() - t0, **parts}
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
            save_checkpoint(self.run_dir / "final.pt", self.student,
                            {"stage": 1, "config": self.config})
        barrier()
        return self.history


class _StudentForward(nn.Module):
    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, pixels: torch.Tensor | None, tokens: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        image = self.student.encode_image(pixels) if pixels is not None else None
        text = self.student.encode_text(tokens) if tokens is not None else None
        return image, text


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_arg_parser("Stage 1: intra-modal contrastive distillation")
    parser.add_argument("--resume", help="a latest.pt / stepN.pt checkpoint of this run")
    parser.add_argument("--stage1-loss", choices=LOSSES,
                        help="infonce (paper), mse, intermodal (ablations), none (skip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.overrides)
    if config.get("recipe") == "minilm_text":
        from training import minilm_stage1  # the starter engineer's text-only recipe

        return int(minilm_stage1.main(config) or 0)
    if args.stage1_loss:
        config.setdefault("train", {})["loss"] = args.stage1_loss
    trainer = Stage1Trainer(config)
    history = trainer.run(resume=args.resume)
    if trainer.info.is_main:
        print(json.dumps({"steps": trainer.step, "skipped_images": trainer.skipped_images,
                          "last_loss": history[-1]["loss"] if history else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
