"""Data-parallel runs under ``torchrun`` (``run.parallel``): the process group and what the recipe asks of it.

``torchrun --standalone --nproc_per_node N -m lowrank_train pretrain recipe.yaml`` starts N processes; with
``run.parallel: auto`` (``WORLD_SIZE > 1``) or ``ddp`` each one joins a process group (gloo on the CPU, nccl on
CUDA, ``cuda:LOCAL_RANK`` per rank), reads its share of every global batch
(:class:`~lowrank_train.data.sharding.RankShare`) and averages gradients: through
``torch.nn.parallel.DistributedDataParallel``, or, layer-wise, inside the engine's own backward hooks
(:class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer`). Rank 0 alone writes the run folder.
``run.parallel: fsdp2`` (and ``auto`` where :func:`~lowrank_train.train.config.fsdp2_refusals` allows it) shards the
model with FSDP2 instead and checkpoints with DCP (:mod:`lowrank_train.train.sharded`).

:class:`Ranks` is what :class:`~lowrank_train.train.loop.TrainingRecipe` asks; a single process gets one whose
collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowrank_train.data.sharding import RankShare
from lowrank_train.nn.quant_linear import is_quantized_weight
from lowrank_train.train.config import ConfigError, TrainConfig, fsdp2_refusals
from lowrank_train.train.setup import resolve_device


class Ranks:
    """This process's place in a run: rank, world size, device, and the collectives the recipe needs.

    Args:
        rank: this process's rank (0 in a single process).
        world_size: the number of processes.
        local_rank: the rank on this machine (picks ``cuda:LOCAL_RANK``).
        engine: ``none``, ``ddp`` or ``fsdp2`` (default: ``ddp`` for several processes).
        reason: why that engine (the run log says it).
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_rank: int = 0, *, engine: str = "", reason: str = ""
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.engine = engine or ("ddp" if world_size > 1 else "none")
        self.reason = reason

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded over the ranks (FSDP2): collectives in every forward, sharded checkpoints."""
        return self.engine == "fsdp2"

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

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

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
        if not self.distributed or layerwise or self.sharded:  # FSDP2: the model is sharded in place already
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
        on every rank; a single process (and FSDP2, which holds no replicas) passes."""
        if not self.distributed or self.sharded:
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


def choose_engine(config: TrainConfig, mode: str = "pretrain") -> tuple[str, str]:
    """The engine of this process's run, ``none``, ``ddp`` or ``fsdp2``, and why (for the run log).

    ``auto`` is ``fsdp2`` under ``torchrun`` with ``WORLD_SIZE > 1`` when :func:`fsdp2_refusals` has nothing to say,
    else ``ddp`` (the reason names what FSDP2 refused); one process is ``none``.

    Raises:
        ConfigError: ``ddp`` / ``fsdp2`` outside ``torchrun`` (no ``WORLD_SIZE`` / ``RANK`` in the environment), or
            ``fsdp2`` for a run it does not support (the keys, and the engine to use instead).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = config.run.parallel
    if wanted == "none" or (wanted == "auto" and world_size == 1):
        return "none", f"run.parallel={wanted}, one process"
    if "RANK" not in os.environ:
        raise ConfigError(
            f"run.parallel={wanted} needs the torchrun environment (RANK, WORLD_SIZE): start the run with "
            "`torchrun --nproc_per_node N -m lowrank_train pretrain ...`, or set run.parallel=auto"
        )
    refusals = fsdp2_refusals(config)
    if mode != "pretrain":
        refusals.append(f"`lowrank-train {mode}` (WeLore low-rank layers) runs under DDP only: use run.parallel=ddp")
    if wanted == "fsdp2" and refusals:
        raise ConfigError(f"run.parallel=fsdp2: {'; '.join(refusals)}")
    if wanted == "ddp":
        return "ddp", "run.parallel=ddp"
    if wanted == "auto" and refusals:
        return "ddp", f"run.parallel=auto picked DDP, as FSDP2 does not support this run ({'; '.join(refusals)})"
    return "fsdp2", f"run.parallel={wanted}" + (f", WORLD_SIZE={world_size}" if wanted == "auto" else "")


@contextlib.contextmanager
def process_group(config: TrainConfig, mode: str = "pretrain") -> Iterator[Ranks]:
    """This process's :class:`Ranks`; under ``torchrun`` a process group for the block, destroyed after it.

    The backend is nccl when the run's device is CUDA, else gloo.
    """
    engine, reason = choose_engine(config, mode)
    if engine == "none":
        yield Ranks(reason=reason)
        return
    ranks = Ranks(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ.get("LOCAL_RANK", "0")),
        engine=engine,
        reason=reason,
    )
    device = ranks.device(resolve_device(config.run.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout()))
    try:
        yield ranks
    except BaseException:
        # Only unregistered: freeing a group whose peer died would wait on it, and the error must get out first.
        dist.destroy_process_group()
        raise
    end_process_group()


def end_process_group() -> None:
    """Destroys the default process group, after freeing the unreachable objects that still hold it.

    FSDP2 modules, their DTensors and hooks form reference cycles that keep the group and its pending work alive
    past ``destroy_process_group``. Left to the interpreter's exit, gloo's worker thread then drops a tensor while
    Python is finalizing and the process aborts ("terminate called without an active exception", at random).
    A collection first lets the group go while everything is alive.
    """
    gc.collect()
    dist.destroy_process_group()


TIMEOUT_ENV_VAR = "LOWRANK_TRAIN_COLLECTIVE_TIMEOUT"
KILL_ENV_VAR = "LOWRANK_TRAIN_KILL_RANK"


class RankLostError(ConnectionError):
    """A collective failed because another rank stopped (killed, out of memory, its machine gone) or timed out.

    A ``ConnectionError`` (an ``OSError``), so the command line reports it in one line on every surviving rank.
    """


def rank_lost(error: BaseException, ranks: Ranks, checkpoint: str | None, resume: str) -> RankLostError:
    """The error a surviving rank ends with: what failed, the last complete checkpoint, how to resume."""
    cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    where = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return RankLostError(
        f"rank {ranks.rank} of {ranks.world_size}: a collective failed ({cause}): another rank has stopped (killed, "
        f"out of memory, its machine gone) or did not answer within {collective_timeout():.0f} s "
        f"({TIMEOUT_ENV_VAR}). The run stops; {where}. Resume with: {resume}"
    )


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed or timed-out collective (gloo / NCCL), not a bug of the rank itself."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out", "Gloo")
    )


def kill_point(rank: int, step: int) -> None:
    """The fault-injection hook of the killed-rank tests: ``LOWRANK_TRAIN_KILL_RANK=<rank>:<step>`` SIGKILLs that
    rank as it starts step ``<step>`` (1-based), after the step's first collectives of the other ranks have begun.
    Only those tests set it."""
    spec = os.environ.get(KILL_ENV_VAR, "")
    if not spec:
        return
    target, _, at = spec.partition(":")
    if not (target.isdigit() and at.isdigit()):
        raise ValueError(f"{KILL_ENV_VAR}={spec!r} must be <rank>:<step>")
    if int(target) == rank and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def collective_timeout() -> float:
    """Seconds a collective waits for a missing rank before the survivors fail (``LOWRANK_TRAIN_COLLECTIVE_TIMEOUT``,
    default 30 minutes: a checkpoint or a first step of a large model may keep the others waiting that long)."""
    value = os.environ.get(TIMEOUT_ENV_VAR, "1800")
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV_VAR}={value!r} must be a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV_VAR}={value!r} must be > 0")
    return seconds
