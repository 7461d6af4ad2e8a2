"""The stochastic-rounding write-back of an update into group-quantized weights (Q-GaLore, Sec. 3.3).

Tensors in, tensors out: :func:`requantize_update` returns the fresh codes and scales of ``W * factor + update``;
:func:`lowrank_train.nn.apply_quantized_update` writes them into a quantized layer's buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_train.quant.groupwise import QuantizedTensor


def requantize_update(
    quantized: QuantizedTensor,
    update: Tensor,
    *,
    weight_decay_factor: float = 1.0,
    generator: torch.Generator | None = None,
    stochastic: bool = True,
) -> QuantizedTensor:
    """``W * weight_decay_factor + update`` re-quantized group-wise with fresh scales, as a new QuantizedTensor.

    The arithmetic is fp32. With stochastic rounding ``E[dequantize(result)] = W * factor + update``, so updates
    below one quantization step survive on average; ``stochastic=False`` rounds to nearest (where they vanish).

    Args:
        quantized: the current weight ``W`` (codes + scales), shape ``(m, n)``.
        update: ``(m, n)`` update in any float dtype, on ``quantized``'s device.
        weight_decay_factor: multiplier of the old weight, e.g. ``1 - lr * weight_decay``.
        generator: randomness of the stochastic rounding, on the codes' device type.
        stochastic: stochastic rounding (default) or round to nearest.

    Returns:
        The new weight, same bits and group size; ``quantized`` is unchanged.
    """
    target = quantized.dequantize(torch.float32)
    if weight_decay_factor != 1.0:
        target.mul_(weight_decay_factor)
    target.add_(update.to(torch.float32))
    return QuantizedTensor.from_float(
        target, quantized.bits, quantized.group_size, stochastic=stochastic, generator=generator
    )
