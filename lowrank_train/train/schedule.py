"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (or constant)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, min_lr_ratio: float, kind: str = "cosine") -> float:
    """Multiplier of the peak learning rate for the update applied at ``step`` (0-based).

    Warm-up is linear, reaching the peak at step ``warmup_steps`` (the first step uses ``1 / (warmup_steps + 1)``
    so that no step is wasted with a zero rate); then cosine from 1 down to ``min_lr_ratio`` at the last step.

    Args:
        step: index of the optimizer step, ``0 <= step < max_steps``.
        max_steps: total optimizer steps.
        warmup_steps: steps of linear warm-up.
        min_lr_ratio: final multiplier of the cosine.
        kind: ``"cosine"`` or ``"constant"`` (after warm-up).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown schedule kind {kind!r}; expected 'cosine' or 'constant'")
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's ``lr`` to its ``initial_lr`` times ``factor`` (``initial_lr`` is stored on first use).

    Keeping the peak in the param group (as ``torch.optim.lr_scheduler`` does) puts it in the optimizer's
    ``state_dict``, so a resumed run recomputes exactly the same rates.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
