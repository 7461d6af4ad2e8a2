"""Group-wise INT8 / INT4 quantization, 4-bit packing and stochastic rounding (tensors in, tensors out)."""

from lowrank_train.quant.bits import (
    BASIS_BITS,
    MOMENT_BITS,
    TRAINED_WEIGHT_BITS,
    WEIGHT_BITS,
    bits_allowed,
    check_bits,
)
from lowrank_train.quant.groupwise import (
    DEFAULT_GROUP_SIZE,
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    quantize,
)
from lowrank_train.quant.packing import pack_int4, unpack_int4
from lowrank_train.quant.rounding import stochastic_round

__all__ = [
    "BASIS_BITS",
    "MOMENT_BITS",
    "TRAINED_WEIGHT_BITS",
    "WEIGHT_BITS",
    "bits_allowed",
    "check_bits",
    "DEFAULT_GROUP_SIZE",
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "dequantize",
    "pack_int4",
    "quantize",
    "stochastic_round",
    "unpack_int4",
]
