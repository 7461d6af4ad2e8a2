"""Pure update functions of the low-rank optimizers: tensors in, tensors (or in-place writes) out."""

from __future__ import annotations

import torch

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, step) pairs


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


def apply_weight_update(
    param: torch.Tensor, update: torch.Tensor, *, lr: float | torch.Tensor, weight_decay: float, scale: float
) -> None:
    """W <- W * (1 - lr * weight_decay) + scale * update, in place.

    Decay is decoupled (AdamW) and applied to the full weight, never in the projected space, in the
    same order as ``torch.optim.AdamW`` (decay first) so a full-rank identity projection matches it.

    Args:
        param: (m, n) weight, updated in place.
        update: (m, n) update already multiplied by the learning rate (the inner optimizer's step).
        lr: learning rate, for the decay only.
        weight_decay: decoupled decay coefficient.
        scale: GaLore's alpha.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=scale)
