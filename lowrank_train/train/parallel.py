"""Data-parallel runs under ``torchrun`` (``run.parallel``): the process group and what the recipe asks of it.

``torchrun --standalone --nproc_per_node N -m lowrank_train pretrain recipe.yaml`` starts N processes; with
``run.parallel: auto`` (``WORLD_SIZE > 1``) or ``ddp`` each one joins a process group (gloo on the CPU, nccl on
CUDA, ``cuda:LOCAL_RANK`` per rank), reads its share of every global batch
(:class:`~lowrank_train.data.sharding.RankShare`) and averages gradients: through
``torch.nn.parallel.DistributedDataParallel``, or, layer-wise, inside the engine's own backward hooks
(:class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer`). Rank 0 alone writes the run folder.

:class:`Ranks` is what :class:`~lowrank_train.train.loop.TrainingRecipe` asks; a single process gets one whose
collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowrank_train.data.sharding import RankShare
from lowrank_train.train.config import ConfigError, TrainConfig
from lowrank_train.train.setup import resolve_device


class Ranks:
    """This process's place in a run: rank, world size, device, and the collectives the recipe needs.

    Args:
        rank: this process's rank (0 in a single process).
        world_size: the number of processes.
        local_rank: the rank on this machine (picks ``cuda:LOCAL_RANK``).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: ``cuda:LOCAL_RANK`` for CUDA under several processes."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        """Waits for every rank."""
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any rank (the same answer everywhere)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (a new tensor; SUM then divide, as gloo has no AVG)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may fill a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def share(self, batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """This rank's rows of each global batch of ``batches``; ``batches`` itself in a single process."""
        if not self.distributed:
            return batches
        return RankShare(batches, rank=self.rank, world_size=self.world_size)

    def wrap(self, model: nn.Module, *, layerwise: bool) -> nn.Module:
        """The module to run forward and backward through: DDP around ``model`` when gradients need averaging.

        Layer-wise, the engine averages each gradient in its own hook (no DDP wrapper: DDP's reducer would run
        after the engine has already stepped the parameter).
        """
        if not self.distributed or layerwise:
            return model
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def wants_ddp(config: TrainConfig) -> bool:
    """Whether ``run.parallel`` (with ``WORLD_SIZE`` for ``auto``) asks for a data-parallel run.

    Raises:
        ConfigError: ``ddp`` outside ``torchrun`` (no ``WORLD_SIZE`` / ``RANK`` in the environment).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    mode = config.run.parallel
    if mode == "none":
        return False
    if mode == "ddp" and "RANK" not in os.environ:
        raise ConfigError(
            "run.parallel=ddp needs the torchrun environment (RANK, WORLD_SIZE): start the run with "
            "`torchrun --nproc_per_node N -m lowrank_train pretrain ...`, or set run.parallel=auto"
        )
    return mode == "ddp" or world_size > 1


@contextlib.contextmanager
def process_group(config: TrainConfig) -> Iterator[Ranks]:
    """This process's :class:`Ranks`; under ``run.parallel`` a process group for the block, destroyed after it.

    The backend is nccl when the run's device is CUDA, else gloo.
    """
    if not wants_ddp(config):
        yield Ranks()
        return
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    device = ranks.device(resolve_device(config.run.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
