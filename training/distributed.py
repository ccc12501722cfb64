"""torchrun / DistributedDataParallel helpers. With one process (no torchrun environment) every
function degrades to the single-process behaviour, so the same training code runs on a CPU.

Contrastive losses need negatives from the global batch: ``gather_with_grad`` concatenates the
embeddings of every rank, keeping the autograd path to the local part (torch.distributed.nn's
all_gather sends each rank the gradient of its own slice back in backward)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
        return DistInfo(rank, world_size, local_rank, dev)
    return DistInfo(0, 1, 0, torch.device("cuda" if want_cuda else "cpu"))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` across ranks along dim 0 (rank order); gradients flow to the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_for_rank(n: int, info: DistInfo) -> slice:
    """Contiguous share of n items for this rank (used to split corpus-encoding passes)."""
    per = -(-n // info.world_size)
    return slice(min(n, info.rank * per), min(n, (info.rank + 1) * per))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
