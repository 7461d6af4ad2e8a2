"""Memory of a training step: the estimator (predicted bytes per component and the peak) and the measurements it is
checked against.

* :mod:`lowrank_train.memory.config`: the estimator's inputs, :class:`ModelShape` and :class:`TrainingSetup`;
* :mod:`lowrank_train.memory.estimate`: :func:`estimate_memory`, :class:`MemoryEstimate` and the byte formulas;
* :mod:`lowrank_train.memory.measure`: live storages, saved activations and allocation peaks of real runs.
"""

from typing import Any

from lowrank_train.memory.config import ModelShape, TrainingSetup, llama_shape
from lowrank_train.memory.estimate import (
    GIB,
    MemoryEstimate,
    activation_bytes,
    adam_state_bytes,
    block_activation_bytes,
    estimate_memory,
    format_bytes,
    loss_bytes,
    quantized_bytes,
)
from lowrank_train.memory.measure import PeakTensorBytes, SavedTensorBytes, measure_live_bytes, measure_peak
from lowrank_train.optim.registry import optimizer_names


def __getattr__(name: str) -> Any:
    # The estimator's optimizer names are the registry's; OPTIMIZERS stays importable, always current.
    if name == "OPTIMIZERS":
        return optimizer_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GIB",
    "MemoryEstimate",
    "ModelShape",
    "PeakTensorBytes",
    "SavedTensorBytes",
    "TrainingSetup",
    "activation_bytes",
    "adam_state_bytes",
    "block_activation_bytes",
    "estimate_memory",
    "format_bytes",
    "llama_shape",
    "loss_bytes",
    "measure_live_bytes",
    "measure_peak",
    "quantized_bytes",
]
