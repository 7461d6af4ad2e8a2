"""Modules: low-rank (WeLore) and quantized linear layers."""

from lowrank_train.nn.lowrank_linear import LowRankLinear, lowrank_factors, weighted_matrix  # noqa: F401
from lowrank_train.nn.quant_linear import (  # noqa: F401
    QuantizedWeight,
    QuantLinear,
    apply_quantized_update,
    dequantize_model,
    is_quantized_weight,
    quantize_model,
)
