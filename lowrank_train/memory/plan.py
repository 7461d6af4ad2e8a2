"""Know what fits: the fastest training setup under a memory budget (``lowrank-train estimate CONFIG --fit 12GiB``).

The planner varies the settings that trade memory for speed around a given setup, estimates each candidate with
:func:`lowrank_train.memory.estimate_memory`, keeps those whose predicted peak is within the budget and ranks them.

Searched (issue 15 item 7):

* micro-batch and accumulation: every divisor ``b`` of the global batch (``batch_size * accumulation_steps``) as the
  micro-batch, with ``accumulation_steps = global / b``, so the optimizer sees the same batch;
* activation checkpointing on / off; the chunked loss on / off (at ``loss_chunk_size``); layer-wise steps on / off;
* moment bits: the registered methods of the same family (projecting or not) with fewer bits per Adam moment than
  the setup's (e.g. ``galore`` -> ``galore8bit``, ``qgalore``, ``qgalore4bit``), read from the optimizer registry;
* rank (projecting methods): the setup's, half and a quarter of it (not below 8).

Ranking, in this order:

1. fidelity: 0 = the same update math (all of the first group of settings), 1 = fewer moment bits (another
   method: quantized states, and for Q-GaLore INT8 weights), 2 = a lower rank. A plan that changes how the model
   learns is only chosen when no plan that keeps it fits;
2. the cost model below (predicted time per token relative to the given setup; lower is faster);
3. fewer changed settings, then the smaller peak.

Cost model (relative time per token; rough, documented factors, not measurements):

* micro-batch of ``T`` tokens: ``1 + 1024 / T`` (a fixed per-micro-batch overhead worth ~1024 tokens of compute:
  kernel launches, small matmuls that leave the device idle, per-micro-batch Python);
* activation checkpointing: x 4/3 (one more forward pass on top of forward + backward ~ 1 + 2);
* INT8 / INT4 weights: x 1.10 (the weight is dequantized in every forward and backward);
* layer-wise steps, the chunked loss, fewer moment bits, a lower rank: x 1.0 (the optimizer step and the loss are
  a small part of a step; layer-wise only moves the step into the backward pass).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from lowrank_train.memory.config import ModelShape, TrainingSetup
from lowrank_train.memory.estimate import MemoryEstimate, estimate_memory, format_bytes
from lowrank_train.optim.registry import get_optimizer_method, optimizer_names

MICRO_BATCH_OVERHEAD_TOKENS = 1024
CHECKPOINTING_FACTOR = 4 / 3
QUANTIZED_WEIGHTS_FACTOR = 1.10
MIN_RANK = 8
# The TrainingSetup fields the planner changes.
PLANNED = (
    "batch_size",
    "accumulation_steps",
    "activation_checkpointing",
    "chunked_loss",
    "layerwise",
    "optimizer",
    "rank",
)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_bytes(text: str | int) -> int:
    """``"12GiB"`` -> bytes. Binary units KiB/MiB/GiB/TiB (also K/M/G/T), decimal KB/MB/GB/TB, or a plain number.

    Raises:
        ValueError: for anything else, or a size that is not positive.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"a memory size looks like 12GiB, 500MiB, 16GB or 8G, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class MemoryPlan:
    """One candidate setup with its estimate.

    Attributes:
        setup: the estimator's setup of the plan.
        estimate: its predicted memory.
        relative_time: predicted time per token relative to the setup the search started from (< 1: faster).
        fidelity: 0 same update math, 1 fewer moment bits (another registered method), 2 a lower rank.
        changes: ``{field: (from, to)}`` for the :data:`PLANNED` fields that differ from the starting setup.
    """

    setup: TrainingSetup
    estimate: MemoryEstimate
    relative_time: float
    fidelity: int
    changes: dict[str, tuple[Any, Any]]

    def describe(self) -> str:
        """``batch_size 8 -> 4, accumulation_steps 1 -> 2`` (or ``no change``)."""
        if not self.changes:
            return "no change"
        return ", ".join(f"{key} {old} -> {new}" for key, (old, new) in self.changes.items())


class NothingFitsError(ValueError):
    """No searched setup fits the budget; ``smallest`` is the plan with the lowest predicted peak."""

    def __init__(self, message: str, smallest: MemoryPlan):
        super().__init__(message)
        self.smallest = smallest


def time_per_token(setup: TrainingSetup) -> float:
    """The cost model of the module docstring, in arbitrary units (compare two setups by their ratio)."""
    cost = 1.0 + MICRO_BATCH_OVERHEAD_TOKENS / setup.tokens
    if setup.activation_checkpointing:
        cost *= CHECKPOINTING_FACTOR
    if setup.weight_bits is not None:
        cost *= QUANTIZED_WEIGHTS_FACTOR
    return cost


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _candidate_methods(name: str) -> list[str]:
    method = get_optimizer_method(name)
    if method.state_bytes is not None:  # not Adam moments (SCALE): fewer moment bits mean nothing for it
        return [name]
    fewer = [
        other
        for other in optimizer_names(lowrank=method.lowrank)
        if get_optimizer_method(other).moment_bits < method.moment_bits
        and get_optimizer_method(other).state_bytes is None
    ]
    return [name, *fewer]


def plan_memory(model_config: Any, train_config: Any, budget: int | str) -> list[MemoryPlan]:
    """Every searched setup whose predicted peak is within ``budget``, best first (see the module docstring).

    Args:
        model_config: what :func:`estimate_memory` takes as the model (a ``LlamaConfig``, a dict, a shape).
        train_config: the starting setup, a mapping of :class:`TrainingSetup` fields (or a setup). Method options
            left ``None`` (``proj_bits``, ``weight_bits``, ``adaptive_refresh``) take each tried method's defaults.
        budget: bytes, or a size such as ``"12GiB"`` (:func:`parse_bytes`).

    Returns:
        The fitting plans, best first; the first is the plan to use.

    Raises:
        NothingFitsError: no searched setup fits; the message gives the smallest plan's peak and settings.
        ValueError: an invalid starting setup or budget.
    """
    limit = parse_bytes(budget)
    shape = ModelShape.from_config(model_config)
    base_fields = (
        {f.name: getattr(train_config, f.name) for f in dataclasses.fields(TrainingSetup)}
        if isinstance(train_config, TrainingSetup)
        else dict(train_config)
    )
    base = TrainingSetup.from_config(base_fields)
    base_time = time_per_token(base)
    global_batch = base.batch_size * base.accumulation_steps
    # The setup's own rank always (APOLLO-Mini's is 1, below MIN_RANK), lower ones only down to MIN_RANK.
    ranks = (
        [base.rank]
        if base.rank is None
        else [base.rank, *(r for r in (base.rank // 2, base.rank // 4) if r >= MIN_RANK)]
    )
    if "rank" in base.method.method_options:  # the method fixes its rank: nothing to lower
        ranks = [base.rank]
    plans: list[MemoryPlan] = []
    for method in _candidate_methods(base.optimizer):
        for rank in ranks if get_optimizer_method(method).lowrank else [base.rank]:
            for micro in _divisors(global_batch):
                for checkpointing in (False, True):
                    for chunked in (False, True):
                        for layerwise in (False, True):
                            fields = {
                                **base_fields,
                                "optimizer": method,
                                "rank": rank,
                                "batch_size": micro,
                                "accumulation_steps": global_batch // micro,
                                "activation_checkpointing": checkpointing,
                                "chunked_loss": chunked,
                                "layerwise": layerwise,
                            }
                            try:
                                setup = TrainingSetup.from_config(fields)
                                estimate = estimate_memory(shape, setup)
                            except ValueError:
                                continue  # e.g. a rank the shapes refuse
                            changes = {
                                key: (getattr(base, key), getattr(setup, key))
                                for key in PLANNED
                                if getattr(base, key) != getattr(setup, key)
                            }
                            fidelity = 2 if rank != base.rank else 1 if method != base.optimizer else 0
                            plans.append(
                                MemoryPlan(setup, estimate, time_per_token(setup) / base_time, fidelity, changes)
                            )
    if not plans:
        raise ValueError("the planner found no valid setup to estimate (check the model shapes and the rank)")

    def rank_key(plan: MemoryPlan) -> tuple[int, float, int, int]:
        return (plan.fidelity, round(plan.relative_time, 9), len(plan.changes), plan.estimate.peak)

    fitting = sorted((p for p in plans if p.estimate.peak <= limit), key=rank_key)
    if not fitting:
        smallest = min(plans, key=lambda p: (p.estimate.peak, rank_key(p)))
        raise NothingFitsError(
            f"nothing the planner tries fits in {format_bytes(limit)}: the smallest plan needs "
            f"{format_bytes(smallest.estimate.peak)} ({smallest.describe()}); lower data.seq_len or the global "
            "batch, or use a smaller model",
            smallest,
        )
    return fitting
