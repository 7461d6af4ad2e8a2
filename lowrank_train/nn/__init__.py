"""Modules: low-rank (WeLore) and quantized linear layers."""

from lowrank_train.nn.chunked_loss import causal_lm_loss, chunked_cross_entropy  # noqa: F401
from lowrank_train.nn.lowrank_linear import LowRankLinear, lowrank_factors, weighted_matrix  # noqa: F401
from lowrank_train.nn.meta_init import build_meta_llama, materialize_llama  # noqa: F401
from lowrank_train.nn.quant_linear import (  # noqa: F401
    QuantizedWeight,
    QuantLinear,
    apply_quantized_update,
    dequantize_model,
    is_quantized_weight,
    quantize_model,
)
