"""Pure update functions of the low-rank optimizers: tensors in, tensors (or in-place writes) out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lowrank_train.nn.quant_linear import apply_quantized_update, is_quantized_weight

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, step) pairs
_ROUNDING_SALT = 0x5851F42D4C957F2D  # keeps the rounding stream apart from the basis stream of the same seed


def refresh_due(step: int, last_refresh: int, gap: int) -> bool:
    """True when a parameter's basis must be rebuilt at ``step``.

    Args:
        step: optimizer steps this parameter has taken so far.
        last_refresh: step of the last refresh, negative when the basis was never built.
        gap: steps between refreshes.
    """
    return last_refresh < 0 or step - last_refresh >= gap


def basis_generator(seed: int, refresh_step: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on (seed, refresh_step): refreshes are reproducible and resumable."""
    mixed = (seed * _SEED_MIX + refresh_step) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def rounding_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Generator for the stochastic rounding of a quantized weight at ``step``: reproducible and resumable."""
    return basis_generator(seed ^ _ROUNDING_SALT, step, device)


class ScaledGradient(NamedTuple):
    """A full-rank update ``grad * scales`` kept as its two factors (APOLLO's rule): the write-back forms it inside
    one fused multiply-add, with no m x n temporary (issue 21 item 4).

    Attributes:
        grad: (m, n) the raw gradient, in the weight's frame.
        scales: fp32 scales broadcastable to (m, n): (1, n), (m, 1) or (1, 1); learning rate and sign included.
    """

    grad: torch.Tensor
    scales: torch.Tensor

    def materialize(self) -> torch.Tensor:
        """The fp32 (m, n) update."""
        return self.grad.float() * self.scales


def apply_weight_update(
    param: torch.Tensor,
    update: torch.Tensor | ScaledGradient,
    *,
    lr: float | torch.Tensor,
    weight_decay: float,
    scale: float,
    generator: torch.Generator | None = None,
) -> None:
    """W <- W * (1 - lr * weight_decay) + scale * update, in place: the optimizers' single write-back.

    Decay is decoupled (AdamW) and applied to the full weight, never in the projected space, in the
    same order as ``torch.optim.AdamW`` (decay first) so a full-rank identity projection matches it.
    A quantized (INT8) weight is updated in fp32 and re-quantized with stochastic rounding (Q-GaLore).

    Args:
        param: (m, n) weight, updated in place, or a quantized weight's carrier.
        update: (m, n) update already multiplied by the learning rate (the inner optimizer's step), or a
            :class:`ScaledGradient` (formed inside the write-back).
        lr: learning rate, for the decay only.
        weight_decay: decoupled decay coefficient.
        scale: GaLore's alpha.
        generator: randomness of the stochastic rounding of a quantized weight; ignored for float weights.
    """
    if isinstance(update, ScaledGradient):
        if not is_quantized_weight(param):
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            param.addcmul_(update.grad, update.scales, value=scale)
            return
        update = update.materialize()
    if is_quantized_weight(param):
        decay = 1 - float(lr) * weight_decay
        apply_quantized_update(param, update * scale, weight_decay_factor=decay, generator=generator)
        return
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=scale)


def finite_flags(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One "holds no NaN/Inf" flag per tensor, computed on the device without a host synchronisation.

    Each tensor is reduced to its minimum and maximum (``torch.aminmax``): NaN propagates through both, an Inf
    becomes one of them, and unlike a sum of squares nothing can overflow, so a finite tensor of huge values is not
    reported. On the CPU this is as fast as a sum (an infinity-norm is ~10x slower).

    Args:
        tensors: tensors of any shapes, dtypes and devices.

    Returns:
        (len(tensors),) bool tensor on the first tensor's device (the CPU for an empty list).
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    device = tensors[0].device
    flags = [
        torch.stack(torch.aminmax(t)).isfinite().all() if t.numel() else torch.ones((), dtype=torch.bool)
        for t in tensors
    ]
    return torch.stack([flag.to(device) for flag in flags])
