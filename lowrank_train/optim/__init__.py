"""Optimizers: the GaLore wrapper around any base optimizer, presets, and param groups."""

from lowrank_train.optim.bases import BASE_OPTIMIZERS, resolve_base
from lowrank_train.optim.galore import GaLore
from lowrank_train.optim.layerwise import LayerwiseOptimizer
from lowrank_train.optim.param_groups import LINEAR_TYPES, lowrank_param_groups, register_linear_type
from lowrank_train.optim.presets import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    QGaLoreAdamW4bit,
    QGaLoreAdamW8bit,
)

__all__ = [
    "BASE_OPTIMIZERS",
    "LINEAR_TYPES",
    "GaLore",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "QGaLoreAdamW4bit",
    "QGaLoreAdamW8bit",
    "lowrank_param_groups",
    "register_linear_type",
    "resolve_base",
]
