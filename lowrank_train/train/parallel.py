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
from lowrank_train.nn.quant_linear import is_quantized_weight
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

        INT8 / INT4 weights (:class:`~lowrank_train.nn.quant_linear.QuantizedWeight`): the carrier is a stride-0
        expanded tensor DDP cannot broadcast, so rank 0's floats, codes and scales are broadcast here instead; DDP
        then only averages gradients (the carrier's ``.grad`` is dense). Buffers are not re-broadcast every forward:
        that would hide drift; the (seed, step)-seeded rounding keeps the codes equal (see :meth:`check_replicas`).
        """
        if not self.distributed or layerwise:
            return model
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        if not any(is_quantized_weight(p) for p in model.parameters()):
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        with torch.no_grad():
            for tensor in [*(p for p in model.parameters() if not is_quantized_weight(p)), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, init_sync=False, broadcast_buffers=False
        )

    def check_replicas(self, model: nn.Module) -> None:
        """Raises ``RuntimeError`` naming the tensors (parameters, buffers: INT codes and scales) not bit-identical
        on every rank; a single process passes."""
        if not self.distributed:
            return
        named = [
            (name, t) for name, t in [*model.named_parameters(), *model.named_buffers()] if not is_quantized_weight(t)
        ]
        local = torch.stack([fingerprint(t) for _, t in named])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        differs = torch.stack(gathered).ne(local).flatten(2).any(dim=2).any(dim=0).tolist()
        bad = [name for (name, _), d in zip(named, differs, strict=True) if d]
        if bad:
            raise RuntimeError(
                f"the ranks' model replicas differ in {len(bad)} of {len(named)} tensors (first: {', '.join(bad[:5])})"
            )


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums over the bytes of ``tensor`` (plain and position-weighted): equal for equal bytes, and
    different after almost any change (a single flipped bit always changes the plain sum)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    total = torch.zeros(2, dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), _CHUNK):  # in chunks: int64 copies of a whole embedding would be 8x its size
        chunk = data[start : start + _CHUNK].long()
        weights = torch.arange(start, start + chunk.numel(), device=data.device) % 65521 + 1
        total += torch.stack([chunk.sum(), (chunk * weights).sum()])
    return total


_CHUNK = 1 << 24


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
