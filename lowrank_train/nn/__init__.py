"""Modules: low-rank (WeLore) and quantized linear layers, and model surgery (which layers, replacing them)."""

from lowrank_train.nn.chunked_loss import causal_lm_loss, chunked_cross_entropy  # noqa: F401
from lowrank_train.nn.lowrank_linear import LowRankLinear  # noqa: F401
from lowrank_train.nn.meta_init import build_meta_llama, materialize_llama  # noqa: F401
from lowrank_train.nn.quant_linear import (  # noqa: F401
    QuantizedWeight,
    QuantLinear,
    apply_quantized_update,
    dequantize_model,
    is_quantized_weight,
    quantize_model,
)
from lowrank_train.nn.surgery import (  # noqa: F401
    find_blocks,
    find_target_modules,
    register_linear_type,
    replace_module,
)
