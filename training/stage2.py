"""Stage 2 (paper section 3.2.2): sequential fine-tuning on paired data.

    python -m training.stage2 --config training/configs/teacher_sf.yaml      # T -> T'
    python -m training.stage2 --config training/configs/s6_stage2.yaml       # student S6
    torchrun --nproc_per_node 8 -m training.stage2 --config ...              # DDP

One loop serves both uses:
* teacher sequential fine-tuning (``model.kind: teacher``, no KD/HN): phase "image" trains the
  image tower against the frozen text tower, then phase "text" the text tower against the
  fine-tuned image tower, with the symmetric InfoNCE of eq. 1;
* student sequential fine-tuning (``model.kind: student``, ``teacher:`` T'): phase "image" trains
  the student image tower against T''s (frozen, cached) text embeddings, phase "text" trains the
  student text tower against the fine-tuned student image tower (frozen, cached).
  Loss = L_t2v + L_v2t + KD (KL of matching distributions + intra-modal InfoNCE to T')
  + HN (top-k corpus negatives of the frozen side, mined per epoch by
  ``leanclip.mine_hard_negatives`` with captions of the same image excluded, added to the softmax
  denominator). ``phases: [joint]`` is the "w/o SF" ablation (both towers trained together; HN
  then draws negatives from embeddings refreshed at each epoch start).

Frozen sides never run forward passes during training: their embeddings of the whole corpus are
computed once per phase and looked up, as are T''s embeddings for KD (cached under run_dir/cache,
keyed by a hash of T''s weights). An epoch visits every caption once (``epoch_pairs``) in global
batches of ``train.batch_size`` split across ranks. Each phase ends by restoring its best
validation checkpoint; ``best.pt`` is the best validated model over all phases.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training import losses
from training.data import PairedImages, collate_skipping, epoch_pairs, load_paired, prepare_pixels
from training.distributed import (
    BatchLayout,
    DistInfo,
    TrainableSides,
    all_counts,
    all_true,
    barrier,
    ddp,
    gather_no_grad,
    gather_with_grad,
    init_distributed,
    micro_slice,
)
from training.evaluate import retrieval_recalls
from training.models import (
    build_student_from_settings,
    build_teacher,
    has_own_tokenizer,
    load_model,
    read_checkpoint,
    save_checkpoint,
    student_with_teacher_text,
    tokenize,
    tokenize_for,
    tower_parameters,
)
from training.train_utils import (
    Schedule,
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

log = logging.getLogger("training.stage2")

PHASES = ("image", "text", "joint")

DEFAULT_TRAIN: dict[str, Any] = {
    "phases": ["image", "text"],
    "epochs": 5,
    "batch_size": 96,
    "max_rank_batch": None,
    "lr": 3e-4,
    "weight_decay": 0.1,
    "warmup_steps": 10000,
    "warmup_max_fraction": 0.5,
    "amp": True,
    "kd": True,
    "kd_weight": 1.0,
    "kd_contrastive_weight": 1.0,
    "kd_temperature": 0.05,
    "hn": True,
    "hn_k": 8,
    "hn_weight": 1.0,
    "num_workers": 4,
    "checkpoint_every": 1000,
    "keep_checkpoints": False,
    "eval_batch_size": 256,
    "max_steps": None,
    "log_every": 50,
    "image_phase_text": None,
}


# --------------------------------------------------------------------------------------------
# Models


def build_stage2_models(config: Mapping[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """(the model to fine-tune, the frozen fine-tuned teacher T' or None)."""
    configure_weights(config)  # a config's weights_dir: every pretrained weight from that folder
    mcfg = dict(config.get("model", {}))
    kind = mcfg.get("kind", "student")
    tiny = bool(mcfg.get("tiny", False))
    teacher_ft = None
    if config.get("teacher"):
        teacher_ft = build_teacher(mcfg.get("teacher_name", "ViT-B-32"), config["teacher"], tiny=tiny)
        teacher_ft.eval().requires_grad_(False)
    if kind == "teacher":
        if mcfg.get("init"):
            return load_model(mcfg["init"]).train(), teacher_ft
        return build_teacher(
            mcfg.get("teacher_name", "ViT-B-32"), mcfg.get("teacher_pretrained", "openai"), tiny=tiny
        ), teacher_ft
    if kind != "student":
        raise ValueError(f"model.kind must be 'teacher' or 'student', got {kind!r}")
    if teacher_ft is None and not mcfg.get("init"):
        # (a stage-1 student fine-tuned without KD and against its own towers needs no teacher:
        # the TinyBERT baseline)
        raise ValueError(
            "student fine-tuning needs 'teacher:' (the fine-tuned teacher T', a "
            "leanclip checkpoint from the teacher_sf config, or an open_clip tag)"
        )
    if mcfg.get("init"):  # the stage-1 student
        student = load_model(mcfg["init"])
    else:  # "w/o stage-1": image backbone from its own pre-training, text copied from T'
        student = build_student_from_settings(mcfg, teacher_ft, tiny=tiny)
    if mcfg.get("text_from_teacher", False):
        if teacher_ft is None:
            raise ValueError("model.text_from_teacher needs 'teacher:'")
        student = student_with_teacher_text(student, teacher_ft)
    return student.train(), teacher_ft


class PairedEncoders(nn.Module):
    """encode_image from one model, encode_text from another (e.g. student image + T' text)."""

    def __init__(self, image_model: nn.Module, text_model: nn.Module) -> None:
        super().__init__()
        self.image_model, self.text_model = image_model, text_model
        self.image_size, self.image_mean = image_model.image_size, image_model.image_mean
        self.image_std, self.context_length = image_model.image_std, text_model.context_length

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_model.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_model.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return tokenize_for(self.text_model, texts)


def set_trainable(model: nn.Module, phase: str) -> None:
    trainable = set(["logit_scale"])
    if phase in ("image", "joint"):
        trainable.update(tower_parameters(model, "image"))
    if phase in ("text", "joint"):
        trainable.update(tower_parameters(model, "text"))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


# --------------------------------------------------------------------------------------------
# Mining


# The fastest exact option (issue 15): the corpus scan runs in int8 (VNNI where the CPU has it)
# and the top k + margin candidates are re-scored in f32, so the returned ids and scores are the
# f32 ones (docs/mining.md states the guarantee). Plain f32 on CPUs without VNNI.
MINING_PRECISION = "i8"


def mine(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    query_groups: np.ndarray,
    corpus_groups: np.ndarray,
    corpus_valid: np.ndarray | None = None,
    info: DistInfo | None = None,
) -> np.ndarray:
    """Top-k corpus rows per query by inner product (ties by row), skipping rows of the query's
    own group (its positives); -1 where fewer than k are eligible. Unreadable corpus rows are
    left out. Under torchrun the corpus is sharded: each rank mines against its 1/W of the
    corpus rows while query blocks travel the ring of ranks (``training.scale``, docs/scale.md),
    and every rank gets all the lists: the same ids in the same order as one process."""
    from leanclip.mining import hard_negative_ids

    info = info or DistInfo(0, 1, 0, torch.device("cpu"))
    rows = np.arange(len(corpus)) if corpus_valid is None else np.flatnonzero(corpus_valid)
    if info.enabled:
        from training import scale

        found, _ = scale.mine(
            np.ascontiguousarray(queries, np.float32),
            np.ascontiguousarray(corpus[rows], np.float32),
            k,
            info,
            np.ascontiguousarray(query_groups, np.int64),
            np.ascontiguousarray(corpus_groups[rows], np.int64),
            layout="corpus",
            metric="ip",
            dtype="f32",
            precision=MINING_PRECISION,
        )
        return np.where(found >= 0, rows[np.maximum(found, 0)], -1)
    return hard_negative_ids(
        np.arange(len(queries)),
        np.ascontiguousarray(queries, np.float32),
        rows,
        np.ascontiguousarray(corpus[rows], np.float32),
        k,
        query_groups=np.ascontiguousarray(query_groups, np.int64),
        corpus_groups=np.ascontiguousarray(corpus_groups[rows], np.int64),
        metric="ip",
        dtype="f32",
        precision=MINING_PRECISION,
    )


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Stage2State:
    phase_index: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = -math.inf
    best_overall: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped_images: int = 0


class Stage2Trainer:
    def __init__(self, config: Mapping[str, Any], info: DistInfo | None = None) -> None:
        self.config = dict(config)
        unknown = set(config.get("train", {})) - set(DEFAULT_TRAIN)
        if unknown:
            raise ValueError(
                f"unknown stage-2 train settings {sorted(unknown)}; known: {sorted(DEFAULT_TRAIN)}"
            )
        self.train_cfg = {**DEFAULT_TRAIN, **dict(config.get("train", {}))}
        self.info = info or init_distributed(config.get("device"))
        self.run_dir = Path(config["run_dir"])
        self.cache_dir = self.run_dir / "cache"
        if self.info.is_main:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self.seed = int(config.get("seed", 0))
        seed_everything(self.seed)
        self.model, self.teacher = build_stage2_models(config)
        self.is_student = self.model.leanclip_config["kind"] == "student"
        self.model.to(self.info.device)
        if self.teacher is not None:
            self.teacher.to(self.info.device)
        for phase in self.train_cfg["phases"]:
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}; use {PHASES}")
        self.train = load_paired(config["data"]["train"])
        self.val = load_paired(config["data"]["val"]) if config["data"].get("val") else None
        self.tokens = tokenize_for(self.model, self.train.captions).to(torch.int32)
        # a student with its own tokenizer (HF text tower): T' keeps CLIP's tokens
        self.teacher_tokens = self.tokens
        if self.teacher is not None and has_own_tokenizer(self.model):
            self.teacher_tokens = tokenize(self.train.captions, int(self.teacher.context_length)).to(
                torch.int32
            )
        self.load_size = load_size_for(*(m for m in (self.model, self.teacher) if m is not None))
        self.amp = bool(self.train_cfg["amp"]) and self.info.device.type == "cuda"
        self.layout = BatchLayout(
            int(self.train_cfg["batch_size"]), self.info.world_size, self.train_cfg["max_rank_batch"]
        )
        self.state = Stage2State()
        self.teacher_images: np.ndarray | None = None
        self.teacher_texts: np.ndarray | None = None
        self.image_valid = np.ones(len(self.train), dtype=bool)
        phases = set(self.train_cfg["phases"])
        if (
            self.is_student
            and phases == {"image"}
            and not self.config.get("model", {}).get("text_from_teacher", False)
        ):
            log.warning(
                "phases [image] validate the student image tower with T''s text, but "
                "the saved checkpoints keep the student's own text tower; set "
                "model.text_from_teacher: true to save the pairing that was validated"
            )
        if self.train_cfg["kd"] and self.teacher is None:
            raise ValueError("train.kd needs a teacher (config 'teacher:')")

    # ---------------------------------------------------------------- caches
    def _cached(self, name: str, compute: Any) -> Any:
        """np arrays cached under run_dir/cache (written by rank 0), so resuming skips them."""
        path = self.cache_dir / f"{name}.npz"
        if all_true(path.is_file(), self.info):
            with np.load(path) as data:
                return tuple(data[k] for k in sorted(data.files))
        result = compute()
        if self.info.is_main:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **{f"a{i}": a for i, a in enumerate(result)})
            tmp.replace(path)
        barrier()
        return result

    def _encode_images(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return encode_image_files(
            model,
            self.train.images,
            self.load_size,
            int(self.train_cfg["eval_batch_size"]),
            self.info,
            int(self.train_cfg["num_workers"]),
            self.amp,
        )

    def _encode_texts(self, model: nn.Module, rows: np.ndarray | None = None) -> np.ndarray:
        table = self.teacher_tokens if model is self.teacher else self.tokens
        tokens = table if rows is None else table[torch.as_tensor(rows)]
        return encode_token_rows(model, tokens, int(self.train_cfg["eval_batch_size"]), self.info, self.amp)

    def prepare_teacher_cache(self) -> None:
        if self.teacher is None:
            return
        # keyed by the teacher's weights (not its path: T' retrained in place must not reuse
        # stale embeddings) and the training data
        tag = hashlib.sha256(
            json.dumps(
                [model_fingerprint(self.teacher), self.config["data"]["train"], self.model.context_length],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:12]
        images, valid = self._cached(f"teacher_images_{tag}", lambda: self._encode_images(self.teacher))
        (texts,) = self._cached(f"teacher_texts_{tag}", lambda: (self._encode_texts(self.teacher),))
        self.teacher_images, self.teacher_texts = images, texts
        self.image_valid &= valid.astype(bool)

    def frozen_side(self, phase_index: int, phase: str) -> np.ndarray | None:
        """Embeddings of the side this phase keeps fixed, for the whole corpus."""
        if phase == "image":
            source = self.train_cfg["image_phase_text"] or ("teacher" if self.is_student else "self")
            if source == "teacher":
                if self.teacher_texts is None:
                    raise ValueError("image_phase_text 'teacher' needs a teacher")
                return self.teacher_texts
            (texts,) = self._cached(
                f"phase{phase_index}_frozen_text", lambda: (self._encode_texts(self.model),)
            )
            return texts
        if phase == "text":
            images, valid = self._cached(
                f"phase{phase_index}_frozen_images", lambda: self._encode_images(self.model)
            )
            self.image_valid &= valid.astype(bool)
            return images
        return None

    def epoch_plan(
        self, phase_index: int, phase: str, epoch: int, frozen: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """The epoch's (image, caption) schedule (every caption once, ``epoch_pairs``) and its
        mined hard negatives (i2t per image, t2i per caption), computed at the start of the epoch
        with the current model and saved so a resumed run reuses them."""

        def compute() -> tuple[np.ndarray, ...]:
            pairs = epoch_pairs(self.train, self.seed, phase_index, epoch)
            if not self.train_cfg["hn"]:
                return (pairs,)
            k = int(self.train_cfg["hn_k"])
            n_img = len(self.train)
            arrays: list[np.ndarray] = [pairs]
            text_table = frozen if phase == "image" else None
            image_table = frozen if phase == "text" else None
            image_valid = self.image_valid
            if phase in ("image", "joint"):
                q_images, valid = self._encode_images(self.model)
                image_valid = image_valid & valid.astype(bool)
                if text_table is None:
                    text_table = self._encode_texts(self.model)
                i2t = mine(
                    q_images, text_table, k, np.arange(n_img), self.train.caption_image, info=self.info
                )
                arrays += [i2t, text_table if phase == "joint" else np.zeros((0,), np.float32)]
            else:
                arrays += [np.zeros((0, k), np.int64), np.zeros((0,), np.float32)]
            if phase in ("text", "joint"):
                q_texts = self._encode_texts(self.model)
                if image_table is None:
                    image_table = q_images if phase == "joint" else None
                t2i = mine(
                    q_texts,
                    image_table,
                    k,
                    self.train.caption_image,
                    np.arange(n_img),
                    image_valid,
                    info=self.info,
                )
                arrays += [t2i, image_table if phase == "joint" else np.zeros((0,), np.float32)]
            else:
                arrays += [np.zeros((0, k), np.int64), np.zeros((0,), np.float32)]
            return tuple(arrays)

        arrays = self._cached(f"phase{phase_index}_epoch{epoch}_plan", compute)
        names = ["pairs", "i2t", "i2t_table", "t2i", "t2i_table"]
        # np.savez keys a0..a4 sort as written
        return dict(zip(names, arrays))

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, phase: str) -> dict[str, float] | None:
        if self.val is None:
            return None
        from training.evaluate import embed_corpus

        text_model = self.model
        if (
            phase == "image"
            and self.is_student
            and (self.train_cfg["image_phase_text"] or "teacher") == "teacher"
        ):
            text_model = self.teacher  # the pairing being trained: student image + T' text
        pair = PairedEncoders(self.model, text_model)
        images, texts, valid = embed_corpus(
            pair,
            self.val,
            self.info,
            int(self.train_cfg["eval_batch_size"]),
            int(self.train_cfg["num_workers"]),
            self.amp,
        )
        return retrieval_recalls(images, texts, self.val.caption_image, image_valid=valid)

    # ---------------------------------------------------------------- checkpoints
    def _train_state(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> dict[str, Any]:
        s = self.state
        return {
            "stage": 2,
            "config": self.config,
            "train_state": {
                "phase_index": s.phase_index,
                "epoch": s.epoch,
                "step_in_epoch": s.step_in_epoch,
                "global_step": s.global_step,
                "best_metric": s.best_metric,
                "best_overall": s.best_overall,
                "history": s.history,
                "evals": s.evals,
                "skipped_images": s.skipped_images,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            },
        }

    def save(
        self, name: str, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> Path:
        path = self.run_dir / name
        if self.info.is_main:
            save_checkpoint(path, self.model, self._train_state(optimizer, scheduler))
        barrier()
        return path

    def resume(self, path: str | Path) -> dict[str, Any]:
        payload = read_checkpoint(path)
        if payload.get("stage") != 2:
            raise ValueError(f"{path} is not a stage-2 training checkpoint")
        self.model.load_state_dict(payload["state_dict"])
        ts = payload["train_state"]
        self.state = Stage2State(
            ts["phase_index"],
            ts["epoch"],
            ts["step_in_epoch"],
            ts["global_step"],
            ts["best_metric"],
            ts.get("best_overall", ts["best_metric"]),
            ts["history"],
            ts["evals"],
            ts["skipped_images"],
        )
        return ts

    # ---------------------------------------------------------------- loop
    def schedule(self) -> Schedule:
        """One epoch visits every caption of a readable image once, in global batches."""
        n_pairs = int(self.image_valid[self.train.caption_image].sum())
        return plan_schedule(
            n_pairs,
            self.layout.global_batch,
            int(self.train_cfg["epochs"]),
            int(self.train_cfg["warmup_steps"]),
            float(self.train_cfg["warmup_max_fraction"]),
        )

    def steps_per_epoch(self) -> int:
        return self.schedule().steps_per_epoch

    def clear_run_caches(self) -> None:
        """A fresh (not resumed) run must not reuse the epoch plans or frozen-side embeddings an
        earlier run left in the same run_dir: they depend on that run's weights."""
        if self.info.is_main:
            for path in self.cache_dir.glob("phase*.npz"):
                path.unlink()
        barrier()

    def run(self, resume: str | Path | None = None) -> Stage2State:
        resumed = self.resume(resume) if resume else None
        if resumed is None:
            self.clear_run_caches()
        self.prepare_teacher_cache()
        phases = list(self.train_cfg["phases"])
        epochs = int(self.train_cfg["epochs"])
        max_steps = self.train_cfg["max_steps"]
        for phase_index in range(self.state.phase_index, len(phases)):
            phase = phases[phase_index]
            if resumed is None or phase_index != resumed["phase_index"]:
                self.state.phase_index, self.state.epoch, self.state.step_in_epoch = (phase_index, 0, 0)
                self.state.best_metric = -math.inf
            set_trainable(self.model, phase)
            frozen = self.frozen_side(phase_index, phase)
            schedule = self.schedule()
            steps = schedule.steps_per_epoch
            optimizer = make_optimizer(
                self.model.named_parameters(),
                float(self.train_cfg["lr"]),
                float(self.train_cfg["weight_decay"]),
            )
            scheduler = cosine_with_warmup(optimizer, schedule.warmup_steps, schedule.total_steps)
            if self.info.is_main:
                log.info(
                    json.dumps(
                        {
                            "stage": 2,
                            "phase": phase,
                            **self.layout.describe(),
                            "steps_per_epoch": steps,
                            "epochs": epochs,
                            "warmup_steps": schedule.warmup_steps,
                        }
                    )
                )
            if resumed is not None and phase_index == resumed["phase_index"]:
                optimizer.load_state_dict(resumed["optimizer"])
                scheduler.load_state_dict(resumed["scheduler"])
                set_rng_state(resumed["rng"])
            forward = ddp(TrainableSides(self.model), self.info)
            phase_steps = 0
            for epoch in range(self.state.epoch, epochs):
                self.state.epoch = epoch
                plan = self.epoch_plan(phase_index, phase, epoch, frozen)
                start = self.state.step_in_epoch
                stop = steps if max_steps is None else min(steps, start + int(max_steps) - phase_steps)
                phase_steps += self._train_epoch(
                    phase, plan, frozen, forward, optimizer, scheduler, start, stop, steps
                )
                finished_epoch = stop == steps
                if finished_epoch:
                    self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
                    self._end_of_epoch(phase, optimizer, scheduler)
                if max_steps is not None and phase_steps >= int(max_steps):
                    break
            if max_steps is not None and phase_steps >= int(max_steps) and (self.state.epoch < epochs):
                self.save("latest.pt", optimizer, scheduler)
                return self.state  # a truncated run (smoke tests) stops here
            self._restore_best_of_phase(phase_index)
            resumed = None
        if self.info.is_main:
            save_checkpoint(self.run_dir / "final.pt", self.model, {"stage": 2, "config": self.config})
        barrier()
        return self.state

    def _batches(self, plan: Mapping[str, np.ndarray], phase: str, start: int, stop: int):
        """This rank's share of each step's global batch, from step ``start`` (resume position)."""
        pairs = plan["pairs"]
        pairs = pairs[self.image_valid[pairs[:, 0]]]
        local = self.layout.rank_batch(self.info.rank)
        local_pairs = pairs[self.layout.rows(self.info.rank, start, stop)]
        if phase == "text":  # no pixels needed: the image side is the frozen cache
            for s in range(stop - start):
                chunk = local_pairs[s * local : (s + 1) * local]
                yield {
                    "skipped": 0,
                    "size": len(chunk),
                    "image_index": torch.as_tensor(chunk[:, 0]),
                    "caption_index": torch.as_tensor(chunk[:, 1]),
                    "pixels": None,
                }
            return
        dataset = PairedImages(self.train, self.load_size)
        dataset.set_pairs(local_pairs)
        loader = DataLoader(
            dataset,
            batch_size=local,
            shuffle=False,
            collate_fn=collate_skipping,
            num_workers=int(self.train_cfg["num_workers"]),
            persistent_workers=False,
        )
        for batch in loader:
            if batch["size"] == 0:
                yield {"skipped": batch["skipped"], "size": 0, "image_index": None}
                continue
            image_index, pixels, caption_index = batch["columns"]
            yield {
                "skipped": batch["skipped"],
                "size": batch["size"],
                "image_index": image_index,
                "caption_index": caption_index,
                "pixels": pixels,
            }

    def _train_epoch(
        self,
        phase: str,
        plan: Mapping[str, np.ndarray],
        frozen: np.ndarray | None,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        start: int,
        stop: int,
        steps: int,
    ) -> int:
        cfg = self.train_cfg
        done = 0
        for step, batch in zip(range(start, stop), self._batches(plan, phase, start, stop)):
            t0 = time.perf_counter()
            # every rank learns every rank's batch size (unreadable images shrink it): gathers
            # use them, and a step where some rank has too few images is skipped by all ranks
            counts = all_counts([batch["size"], batch["skipped"]], self.info)
            sizes = [c[0] for c in counts]
            self.state.skipped_images += sum(c[1] for c in counts)
            if min(sizes) < self.layout.grad_accum:
                log.warning("step %d skipped on every rank: readable images per rank %s", step, sizes)
                parts = None
            else:
                parts = self._train_step(phase, batch, sizes, plan, frozen, forward, optimizer)
            scheduler.step()  # the schedule follows the position in the epoch
            self.state.global_step += 1
            self.state.step_in_epoch = step + 1
            if parts is not None:
                record = {
                    "phase": phase,
                    "epoch": self.state.epoch,
                    "step": step,
                    "global_step": self.state.global_step,
                    "lr": scheduler.get_last_lr()[0],
                    "batch": sum(sizes),
                    "seconds": time.perf_counter() - t0,
                    **parts,
                }
                self.state.history.append(record)
                if self.info.is_main and (step % int(cfg["log_every"]) == 0 or step == steps - 1):
                    log.info(json.dumps(record))
            done += 1
            every = int(cfg["checkpoint_every"])
            if every and self.state.global_step % every == 0 and step + 1 < steps:
                self.save("latest.pt", optimizer, scheduler)
                if cfg["keep_checkpoints"]:
                    self.save(f"step{self.state.global_step}.pt", optimizer, scheduler)
        return done

    def _train_step(
        self,
        phase: str,
        batch: Mapping[str, Any],
        sizes: list[int],
        plan: Mapping[str, np.ndarray],
        frozen: np.ndarray | None,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, float]:
        device = self.info.device
        accum = self.layout.grad_accum
        image_index = batch["image_index"]
        caption_index = batch["caption_index"]
        n = len(image_index)
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for m in range(accum):
            sl = micro_slice(m, accum, n)
            micro_sizes = [micro_slice(m, accum, k).stop - micro_slice(m, accum, k).start for k in sizes]
            img_idx, cap_idx = image_index[sl], caption_index[sl]
            pixels = tokens = None
            if phase in ("image", "joint"):
                pixels = prepare_pixels(self.model, batch["pixels"][sl].to(device))
            if phase in ("text", "joint"):
                tokens = self.tokens[cap_idx].to(device).long()
            sync = m == accum - 1 or not self.info.enabled
            context = forward.no_sync() if not sync else contextlib.nullcontext()
            with context:
                with autocast(device, self.amp):
                    image, text, logit_scale = forward(pixels, tokens)
                loss, parts = self._loss(
                    phase, image, text, logit_scale, img_idx, cap_idx, plan, frozen, micro_sizes
                )
                (loss / accum).backward()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / accum
        totals["grad_norm"] = grad_norm(self.model.parameters())
        optimizer.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 1/100
            self.model.logit_scale.clamp_(0, math.log(100))
        return totals

    def _loss(
        self,
        phase: str,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        logit_scale: torch.Tensor,
        img_idx: torch.Tensor,
        cap_idx: torch.Tensor,
        plan: Mapping[str, np.ndarray],
        frozen: np.ndarray | None,
        sizes: list[int],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.train_cfg
        device = self.info.device
        lookup = lambda table, idx: torch.from_numpy(table[idx.numpy()]).to(device)  # noqa: E731
        if image is None:
            image = lookup(frozen, img_idx)
        if text is None:
            text = lookup(frozen, cap_idx)
        image_g = gather_with_grad(image.float(), sizes)
        text_g = gather_with_grad(text.float(), sizes)
        t2v, v2t = losses.clip_loss(image_g, text_g, logit_scale)
        parts = {"t2v": float(t2v.detach()), "v2t": float(v2t.detach())}
        loss = t2v + v2t
        if cfg["kd"]:
            t_img = gather_no_grad(lookup(self.teacher_images, img_idx), sizes)
            t_txt = gather_no_grad(lookup(self.teacher_texts, cap_idx), sizes)
            kl = losses.matching_kl(image_g, text_g, t_img, t_txt, logit_scale, self.teacher.logit_scale)
            contrastive = torch.zeros((), device=device)
            tau = float(cfg["kd_temperature"])
            if phase in ("image", "joint"):
                contrastive = contrastive + losses.intra_modal_infonce(image_g, t_img, tau)
            if phase in ("text", "joint"):
                contrastive = contrastive + losses.intra_modal_infonce(text_g, t_txt, tau)
            kd = float(cfg["kd_weight"]) * (kl + float(cfg["kd_contrastive_weight"]) * contrastive)
            parts.update(kd_kl=float(kl.detach()), kd_contrastive=float(contrastive.detach()))
            loss = loss + kd
        if cfg["hn"]:
            hn = torch.zeros((), device=device)
            if phase in ("image", "joint"):
                table = frozen if phase == "image" else plan["i2t_table"]
                hn = hn + self._hn_term(image_g, text_g, plan["i2t"], table, img_idx, logit_scale, sizes)
            if phase in ("text", "joint"):
                table = frozen if phase == "text" else plan["t2i_table"]
                hn = hn + self._hn_term(text_g, image_g, plan["t2i"], table, cap_idx, logit_scale, sizes)
            parts["hn"] = float(hn.detach())
            loss = loss + float(cfg["hn_weight"]) * hn
        parts["loss"] = float(loss.detach())
        return loss, parts

    def _hn_term(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        ids: np.ndarray,
        table: np.ndarray,
        query_idx: torch.Tensor,
        logit_scale: torch.Tensor,
        sizes: list[int],
    ) -> torch.Tensor:
        """``ids`` holds the mined negatives per query id (i2t: image, t2i: caption)."""
        device = self.info.device
        neg_ids = torch.from_numpy(ids[query_idx.numpy()]).to(device)
        valid = neg_ids >= 0
        negatives = torch.from_numpy(table[neg_ids.clamp(min=0).cpu().numpy()]).to(device)
        negatives, valid = gather_no_grad(negatives, sizes), gather_no_grad(valid, sizes)
        return losses.hard_negative_infonce(queries, keys, negatives, logit_scale, valid)

    def _end_of_epoch(
        self, phase: str, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> None:
        metrics = self.evaluate(phase)
        if metrics is not None:
            self.state.evals.append({"phase": phase, "epoch": self.state.epoch, **metrics})
            if self.info.is_main:
                log.info(json.dumps({"eval": metrics, "phase": phase, "epoch": self.state.epoch}))
            if metrics["mean_recall"] > self.state.best_metric:
                self.state.best_metric = metrics["mean_recall"]
                self.save(f"best_phase{self.state.phase_index}.pt", optimizer, scheduler)
            # best.pt: the best validation over every phase, among evaluations of the model
            # being saved (not of a student image tower validated with T''s text)
            if self._validates_saved_model(phase) and metrics["mean_recall"] > self.state.best_overall:
                self.state.best_overall = metrics["mean_recall"]
                self.save("best.pt", optimizer, scheduler)
        self.save("latest.pt", optimizer, scheduler)

    def _validates_saved_model(self, phase: str) -> bool:
        """Whether ``evaluate(phase)`` scores the towers the checkpoint holds."""
        return not (
            phase == "image"
            and self.is_student
            and (self.train_cfg["image_phase_text"] or "teacher") == "teacher"
            and not self.config.get("model", {}).get("text_from_teacher", False)
        )

    def _restore_best_of_phase(self, phase_index: int) -> None:
        """The next phase starts from this phase's best validation checkpoint."""
        path = self.run_dir / f"best_phase{phase_index}.pt"
        if path.is_file():
            self.model.load_state_dict(read_checkpoint(path)["state_dict"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_arg_parser("Stage 2: sequential fine-tuning (teacher T' or student)")
    parser.add_argument("--resume", help="a latest.pt / stepN.pt checkpoint of this run")
    parser.add_argument("--no-sf", action="store_true", help="ablation: joint fine-tuning")
    parser.add_argument("--no-kd", action="store_true", help="ablation: without KD")
    parser.add_argument("--no-hn", action="store_true", help="ablation: without HN")
    parser.add_argument("--hn-k", type=int), parser.add_argument("--hn-weight", type=float)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.overrides)
    train = config.setdefault("train", {})
    if args.no_sf:
        train["phases"] = ["joint"]
    if args.no_kd:
        train["kd"] = False
    if args.no_hn:
        train["hn"] = False
    if args.hn_k is not None:
        train["hn_k"] = args.hn_k
    if args.hn_weight is not None:
        train["hn_weight"] = args.hn_weight
    trainer = Stage2Trainer(config)
    state = trainer.run(resume=args.resume)
    if trainer.info.is_main:
        print(
            json.dumps(
                {
                    "best_val_mean_recall": state.best_overall,
                    "skipped_images": state.skipped_images,
                    "steps": state.global_step,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
