"""Process groups for multi-process FD-loss training (``torchrun``).

``torchrun --nproc_per_node N`` starts N copies of ``fdpipe finetune`` and
sets RANK, WORLD_SIZE and LOCAL_RANK; ``setup`` reads them. Without those
variables (a plain run) it returns a single-process context, and every
helper here is then the identity, so one code path serves both cases.

In a group, each rank generates its share of the batch, ``gather`` joins
the shares of all ranks in rank order, and FD-loss is computed on the whole
batch on every rank. In its backward pass,
``torch.distributed.nn.functional.all_gather`` sums the gradient of the
joined batch over ranks, so rank r's share receives N times its gradient of
the loss. DistributedDataParallel then averages parameter gradients over
ranks, which leaves the gradient of the loss of the whole batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Rank, number of processes and local rank (GPU index on the node) of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files (rank 0)."""
        return self.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x`` of every rank along dim 0; gradients reach the local part."""
        if not self.enabled:
            return x
        return torch.cat(dist_fn.all_gather(x), dim=0)

    @torch.no_grad()
    def gather_detached(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x`` of every rank along dim 0, without autograd."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Return the list of ``obj`` from every rank, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is true on at least one rank (a collective call)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is "
                         f"set by torchrun, so unset it for a single-process run") from None


def context_from_env() -> DistContext:
    """Read RANK, WORLD_SIZE and LOCAL_RANK as set by torchrun (default: one process)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent; start "
                         f"multi-process runs with torchrun")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes; return the context and this rank's device.

    CUDA ranks use the NCCL backend and GPU ``LOCAL_RANK``; CPU ranks use gloo.
    """
    ctx = context_from_env()
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if ctx.local_rank >= available:
            raise RuntimeError(f"rank {ctx.rank} needs GPU {ctx.local_rank} but only {available} "
                               f"GPU(s) are visible; start torchrun with --nproc_per_node at "
                               f"most {available}")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    log.info("rank %d of %d joined the %s process group on %s", ctx.rank, ctx.world_size,
             backend, device)
    return ctx, device


def teardown(ctx: DistContext) -> None:
    """Leave the process group ``setup`` joined, if any."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
