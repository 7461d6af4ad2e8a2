"""lowrank_train: train and fine-tune large language models in far less memory than AdamW needs."""

from lowrank_train.memory import MemoryEstimate, estimate_memory
from lowrank_train.nn import QuantLinear, dequantize_model, quantize_model
from lowrank_train.optim import (
    GaLore,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    LayerwiseOptimizer,
    QGaLoreAdamW4bit,
    QGaLoreAdamW8bit,
    lowrank_param_groups,
)

__version__ = "0.1.0"

__all__ = [
    "GaLore",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "MemoryEstimate",
    "QGaLoreAdamW4bit",
    "QGaLoreAdamW8bit",
    "QuantLinear",
    "__version__",
    "dequantize_model",
    "estimate_memory",
    "lowrank_param_groups",
    "quantize_model",
]
