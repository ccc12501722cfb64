"""torchrun / DistributedDataParallel helpers. With one process (no torchrun environment) every
function degrades to the single-process behaviour, so the same training code runs on a CPU.

The rules every trainer follows under ``torchrun --nproc_per_node W``:

* **Global batch.** Configs give the global batch G (the paper's 84 for stage 1, 96 for stage 2).
  ``BatchLayout`` splits each global batch into contiguous per-rank shares (sizes differ by at
  most one when W does not divide G) and derives the gradient accumulation from an optional
  per-rank memory cap (``max_rank_batch``). One process and W processes see the same examples in
  the same contrastive batches.
* **Agreed shapes.** Unreadable images shrink a rank's share; before gathering, ranks exchange
  their sizes (``all_sizes``) and gather padded tensors (``gather_with_grad`` /
  ``gather_no_grad`` with ``sizes``), so ranks never disagree on a collective's shape. A step in
  which some rank has nothing left is skipped by every rank together.
* **Only what trains is wrapped.** ``TowerForward`` exposes one tower's parameters to DDP (stage 1
  trains the image and text towers independently, never the logit scale), ``TrainableSides``
  the towers and the logit scale a contrastive loss trains, so DDP never waits for gradients of
  parameters a step did not use.
* **Sharded corpus passes.** ``shard_for_rank`` gives each rank a batch-aligned 1/W of a corpus
  (teacher caches, frozen sides, evaluation, mining queries); ``gather_rows`` reassembles the
  full result in order, identical to one process.

Contrastive losses need negatives from the global batch: ``gather_with_grad`` concatenates the
embeddings of every rank, keeping the autograd path to the local part (torch.distributed.nn's
all_gather sends each rank the summed gradient of its own slice back in backward, which DDP's
gradient averaging turns back into the single-process gradient)."""

from __future__ import annotations

import atexit
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: its functions take ``group=group.WORLD``
# as a default argument, evaluated on import. Imported after init_process_group (timm and
# torch._dynamo import it lazily), those defaults pin the default group, destroy_process_group
# cannot end gloo's threads, and they abort the process at interpreter exit (SIGABRT,
# "terminate called without an active exception") after the work is done.
import torch.distributed.nn.functional as dist_fn
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (env RANK / WORLD_SIZE / LOCAL_RANK), or run as a
    single process. ``device``: "cuda", "cpu" or None (cuda when available)."""
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
            # A group still alive at interpreter shutdown lets gloo's worker threads outlive
            # Python, and the process dies with SIGABRT after the work is done (see dist_fn).
            atexit.register(cleanup)
        dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        return DistInfo(rank, world_size, local_rank, dev)
    return DistInfo(0, 1, 0, torch.device("cuda" if want_cuda else "cpu"))


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --------------------------------------------------------------------------------------------
# The global batch


@dataclass(frozen=True)
class BatchLayout:
    """A global batch of ``global_batch`` examples split over ``world_size`` ranks: rank r holds
    the contiguous rows ``share(r)`` of every global batch. ``grad_accum`` micro-steps per step
    keep each rank's forward under ``max_rank_batch`` examples (each micro-step contrasts its own
    1/grad_accum of the global batch, gathered across ranks)."""

    global_batch: int
    world_size: int = 1
    max_rank_batch: int | None = None

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise ValueError(f"train.batch_size (the global batch) must be >= 1, got {self.global_batch}")
        if self.global_batch < self.world_size:
            raise ValueError(
                f"the global batch {self.global_batch} is smaller than the "
                f"{self.world_size} processes; raise train.batch_size"
            )
        if self.max_rank_batch is not None and self.max_rank_batch < 1:
            raise ValueError(f"train.max_rank_batch must be >= 1, got {self.max_rank_batch}")

    def share(self, rank: int) -> slice:
        """Rows of a global batch held by ``rank``."""
        base, extra = divmod(self.global_batch, self.world_size)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (1 if rank < extra else 0))

    def rank_batch(self, rank: int) -> int:
        s = self.share(rank)
        return s.stop - s.start

    @property
    def sizes(self) -> list[int]:
        return [self.rank_batch(r) for r in range(self.world_size)]

    @property
    def grad_accum(self) -> int:
        if self.max_rank_batch is None:
            return 1
        return max(1, math.ceil(self.rank_batch(0) / self.max_rank_batch))

    def rows(self, rank: int, start: int, stop: int) -> np.ndarray:
        """Positions in the epoch's order of this rank's examples for steps [start, stop)."""
        share = self.share(rank)
        steps = np.arange(start, stop, dtype=np.int64)[:, None] * self.global_batch
        return (steps + np.arange(share.start, share.stop, dtype=np.int64)[None, :]).reshape(-1)

    def describe(self) -> dict[str, int]:
        """What a run logs: the effective (optimizer) batch and how it is laid out."""
        return {
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "rank_batch": self.rank_batch(0),
            "grad_accum": self.grad_accum,
            "micro_global_batch": -(-self.global_batch // self.grad_accum),
        }


def micro_slice(m: int, accum: int, n: int) -> slice:
    """Rows of micro-step m of ``accum`` in a local batch of n."""
    return slice(m * n // accum, (m + 1) * n // accum)


def all_counts(values: Sequence[int], info: DistInfo) -> list[list[int]]:
    """Every rank's ``values`` (e.g. [readable images, unreadable images] of this step), in rank
    order: one small all_gather."""
    if not info.enabled:
        return [list(values)]
    local = torch.tensor(list(values), dtype=torch.int64, device=info.device)
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(parts, local)
    return [[int(v) for v in p.tolist()] for p in parts]


def all_true(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on every rank: one decision all ranks act on (e.g. "this cache
    file exists": a rank that saw it written a moment after another checked must not skip a
    computation, with collectives inside, that the other one runs)."""
    return min(c[0] for c in all_counts([int(bool(flag))], info)) == 1


def all_sizes(n: int, info: DistInfo) -> list[int]:
    """Every rank's ``n`` (e.g. images that could be read in this step), in rank order."""
    return [c[0] for c in all_counts([n], info)]


# --------------------------------------------------------------------------------------------
# Gathering


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def gather_with_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` across ranks along dim 0 (rank order); gradients flow to the local part.
    ``sizes``: every rank's row count when they differ (see ``all_sizes``)."""
    if not _active():
        return x
    if sizes is None or len(set(sizes)) == 1:
        return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)
    parts = dist_fn.all_gather(_pad_rows(x, max(sizes)))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def gather_no_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    if not _active():
        return x
    rows = max(sizes) if sizes is not None else x.shape[0]
    padded = _pad_rows(x, rows)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    if sizes is None:
        return torch.cat(parts, dim=0)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _active():
        x = x.clone()
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if _active():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Sharded corpus passes


def shard_for_rank(n: int, info: DistInfo, align: int = 1) -> slice:
    """Contiguous share of n items for this rank, its boundaries multiples of ``align`` (the
    encoding batch size), so every rank runs exactly the batches one process would run."""
    blocks = -(-n // align)
    per = -(-blocks // info.world_size) * align
    return slice(min(n, info.rank * per), min(n, (info.rank + 1) * per))


def gather_rows(local: np.ndarray, n: int, info: DistInfo, align: int = 1) -> np.ndarray:
    """Reassemble the per-rank results of ``shard_for_rank(n, info, align)`` into all n rows
    (every rank gets the whole array, in order)."""
    if not info.enabled:
        return local
    shares = [
        shard_for_rank(n, DistInfo(r, info.world_size, 0, info.device), align) for r in range(info.world_size)
    ]
    sizes = [s.stop - s.start for s in shares]
    tensor = torch.from_numpy(np.ascontiguousarray(local))
    as_bytes = tensor.dtype == torch.bool
    if as_bytes:
        tensor = tensor.to(torch.uint8)
    gathered = gather_no_grad(tensor.to(info.device), sizes).cpu()
    if as_bytes:
        gathered = gathered.bool()
    return gathered.numpy()


# --------------------------------------------------------------------------------------------
# What DDP wraps


class TowerForward(nn.Module):
    """One tower of a dual encoder as the module DDP wraps: it registers only that tower's
    trainable parameters (shared with ``model``, not copied), and its forward is the model's
    ``encode_image`` / ``encode_text``."""

    def __init__(self, model: nn.Module, side: str, parameter_names: Sequence[str]) -> None:
        super().__init__()
        if side not in ("image", "text"):
            raise ValueError(f"side must be 'image' or 'text', got {side!r}")
        self.side = side
        self._model = [model]  # a list: not a submodule, so DDP sees only the tower below
        named = dict(model.named_parameters())
        self.tower = nn.ParameterList([named[n] for n in parameter_names if named[n].requires_grad])
        if not len(self.tower):
            raise ValueError(f"the {side} tower has no trainable parameters")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        return model.encode_image(x) if self.side == "image" else model.encode_text(x)


class TrainableSides(nn.Module):
    """The forward pass DDP wraps for a contrastive loss between a model's own towers: embeds
    whatever sides the phase trains, and returns the logit scale so its gradient is synchronised
    too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixels: torch.Tensor | None, tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        image = self.model.encode_image(pixels) if pixels is not None else None
        text = self.model.encode_text(tokens) if tokens is not None else None
        return image, text, self.model.logit_scale


def ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when running under torchrun."""
    if not info.enabled:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[info.local_rank] if info.device.type == "cuda" else None
    )


def cleanup() -> None:
    """Destroy the process group (registered at exit by ``init_distributed``; safe to repeat)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
