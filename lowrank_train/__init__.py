"""lowrank_train: train and fine-tune large language models in far less memory than AdamW needs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowrank_train._lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first use (PEP 562) so that importing the package
# stays cheap (no torch / transformers until a name needs them): `lowrank-train --help` depends on it.
_EXPORTS = {
    "MemoryEstimate": "lowrank_train.memory",
    "estimate_memory": "lowrank_train.memory",
    "QuantLinear": "lowrank_train.nn",
    "dequantize_model": "lowrank_train.nn",
    "quantize_model": "lowrank_train.nn",
    "APOLLOAdamW": "lowrank_train.optim",
    "APOLLOMini": "lowrank_train.optim",
    "FiraAdamW": "lowrank_train.optim",
    "QAPOLLOMini": "lowrank_train.optim",
    "SCALE": "lowrank_train.optim",
    "GaLore": "lowrank_train.optim",
    "GaLoreAdafactor": "lowrank_train.optim",
    "GaLoreAdamW": "lowrank_train.optim",
    "GaLoreAdamW8bit": "lowrank_train.optim",
    "LayerwiseOptimizer": "lowrank_train.optim",
    "QGaLoreAdamW4bit": "lowrank_train.optim",
    "QGaLoreAdamW8bit": "lowrank_train.optim",
    "lowrank_param_groups": "lowrank_train.optim",
}

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from lowrank_train.memory import MemoryEstimate, estimate_memory  # noqa: F401
    from lowrank_train.nn import QuantLinear, dequantize_model, quantize_model  # noqa: F401
    from lowrank_train.optim import (
        SCALE,
        APOLLOAdamW,
        APOLLOMini,
        FiraAdamW,
        GaLore,
        GaLoreAdafactor,
        GaLoreAdamW,
        GaLoreAdamW8bit,
        LayerwiseOptimizer,
        QAPOLLOMini,
        QGaLoreAdamW4bit,
        QGaLoreAdamW8bit,
        lowrank_param_groups,
    )  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "APOLLOAdamW",
    "APOLLOMini",
    "FiraAdamW",
    "GaLore",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "MemoryEstimate",
    "QAPOLLOMini",
    "QGaLoreAdamW4bit",
    "QGaLoreAdamW8bit",
    "QuantLinear",
    "SCALE",
    "__version__",
    "dequantize_model",
    "estimate_memory",
    "lowrank_param_groups",
    "quantize_model",
]
