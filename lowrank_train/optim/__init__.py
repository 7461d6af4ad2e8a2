"""Optimizers: the GaLore wrapper around any base optimizer, presets, param groups, and the method registry."""

from lowrank_train.optim.bases import BASE_OPTIMIZERS, resolve_base
from lowrank_train.optim.galore import GaLore
from lowrank_train.optim.layerwise import LayerwiseOptimizer
from lowrank_train.optim.param_groups import LINEAR_TYPES, lowrank_param_groups, register_linear_type
from lowrank_train.optim.presets import (
    APOLLOAdamW,
    APOLLOMini,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    QAPOLLOMini,
    QGaLoreAdamW4bit,
    QGaLoreAdamW8bit,
)
from lowrank_train.optim.registry import (
    GALORE_GROUP_OPTIONS,
    OptimizerMethod,
    get_optimizer_method,
    optimizer_names,
    register_optimizer,
    registered_optimizer,
    unregister_optimizer,
)
from lowrank_train.optim.scale import SCALE, scale_param_groups
from lowrank_train.optim.update_rules import UPDATE_RULES, UpdateRule, get_update_rule, register_update_rule

__all__ = [
    "APOLLOAdamW",
    "APOLLOMini",
    "BASE_OPTIMIZERS",
    "FiraAdamW",
    "QAPOLLOMini",
    "SCALE",
    "scale_param_groups",
    "UPDATE_RULES",
    "UpdateRule",
    "get_update_rule",
    "register_update_rule",
    "GALORE_GROUP_OPTIONS",
    "LINEAR_TYPES",
    "GaLore",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "OptimizerMethod",
    "QGaLoreAdamW4bit",
    "QGaLoreAdamW8bit",
    "get_optimizer_method",
    "lowrank_param_groups",
    "optimizer_names",
    "register_linear_type",
    "register_optimizer",
    "registered_optimizer",
    "resolve_base",
    "unregister_optimizer",
]
