"""Stochastic rounding.

Q-GaLore (Zhang et al., 2024, Sec. 3.3) writes every update into INT8 weights with stochastic rounding: a value
``y`` becomes ``ceil(y)`` with probability ``y - floor(y)`` and ``floor(y)`` otherwise, so ``E[round(y)] = y``
and updates smaller than one quantization step still move the weight on average instead of vanishing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stochastic_round(y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Rounds to an integer-valued tensor, up with probability equal to the fractional part.

    Args:
        y: floating tensor of any shape.
        generator: source of the uniform draws; must live on ``y``'s device type. ``None`` uses torch's global
            generator (not reproducible across call orders; pass one for reproducible runs).

    Returns:
        Floating tensor of ``y``'s shape and dtype holding integers, with ``E[result] = y``.

    Raises:
        ValueError: if ``y`` is not floating point or ``generator`` is on another device type.
    """
    if not y.is_floating_point():
        raise ValueError(f"stochastic_round expects a floating tensor, got dtype {y.dtype}")
    if generator is not None and generator.device.type != y.device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but the tensor on {y.device}; "
            "create the generator with torch.Generator(device=tensor.device)"
        )
    # floor(y + u), u ~ U[0, 1): rounds up exactly when u >= 1 - frac(y), i.e. with probability frac(y).
    noise = torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return torch.floor(y + noise)
