"""The bit widths each use of quantization accepts, stated once, and the one function that checks them.

Every config, registry entry and builder that takes a ``*_bits`` value validates it here, so the allowed sets
cannot drift apart between the optimizer registry, the CLI config, the memory estimator and the model builders.
"""

from __future__ import annotations

import numbers
from typing import Any

from lowrank_train.quant.groupwise import SUPPORTED_BITS

WEIGHT_BITS: tuple[int, ...] = SUPPORTED_BITS
"""Bits of a quantized linear layer (:class:`~lowrank_train.nn.QuantLinear`): ``quantize_model``,
``materialize_llama`` and the memory estimator."""

TRAINED_WEIGHT_BITS: tuple[int, ...] = (8,)
"""Bits of the weights an optimizer method or a recipe trains quantized (Q-GaLore's INT8; ``optimizer.weight_bits``
and :class:`~lowrank_train.optim.registry.OptimizerMethod`)."""

BASIS_BITS: tuple[int, ...] = SUPPORTED_BITS
"""Bits of a stored GaLore basis (``proj_bits``)."""

MOMENT_BITS: tuple[int, ...] = (32, 8, 4)
"""Bits per element of the inner optimizer's moments (32: torch, 8: bitsandbytes, 4: torchao)."""


def bits_allowed(allowed: tuple[int, ...], *, optional: bool) -> str:
    """``allowed`` in words, e.g. ``"4, 8 or None"``, for error messages and option docs."""
    words = [str(b) for b in allowed] + (["None"] if optional else [])
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_bits(value: Any, allowed: tuple[int, ...], *, name: str, optional: bool = True) -> int | None:
    """Returns ``value`` as an int (or None) when it is one of ``allowed``.

    Args:
        value: the bit width given (numpy integers accepted).
        allowed: one of this module's sets (:data:`WEIGHT_BITS`, :data:`TRAINED_WEIGHT_BITS`, ...).
        name: the option as the caller spells it, for the message.
        optional: ``None`` (no quantization) is accepted too.

    Raises:
        ValueError: naming the option, the allowed values and the value given.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in allowed:
        raise ValueError(f"{name} must be {bits_allowed(allowed, optional=optional)}, got {value!r}")
    return int(value)
