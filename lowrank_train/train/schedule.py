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


def schedule_segment(max_steps: int) -> dict[str, float]:
    """The schedule of a run that was never extended: warm-up and cosine over ``max_steps`` from step 0."""
    return {"start_step": 0.0, "start_factor": 1.0, "max_steps": float(max_steps)}


def segment_lr_factor(
    step: int, *, segment: dict[str, float], warmup_steps: int, min_lr_ratio: float, kind: str = "cosine"
) -> float:
    """Multiplier of the peak learning rate at ``step`` under a (possibly re-stretched) schedule segment.

    The segment of a run never extended (``start_step`` 0) is :func:`lr_factor` itself. After a resume with a
    larger ``run.max_steps`` (:func:`extend_schedule`) the cosine goes on from ``start_factor`` at
    ``start_step`` down to ``min_lr_ratio`` at the segment's last step: no jump in the rate, and the new end is
    reached at ``min_lr_ratio`` as if the run had been planned that long from the resume point.
    """
    start, start_factor, max_steps = int(segment["start_step"]), segment["start_factor"], int(segment["max_steps"])
    if start == 0 or kind != "cosine":
        return lr_factor(step, max_steps=max_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, kind=kind)
    progress = min(1.0, max(0, step - start) / max(1, max_steps - 1 - start))
    return min_lr_ratio + (start_factor - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def extend_schedule(
    segment: dict[str, float], *, step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float, kind: str
) -> dict[str, float]:
    """The segment that continues ``segment`` at ``step`` (steps done) to a new ``max_steps``.

    Inside warm-up (or for a constant schedule) no decay has happened yet, so the plain schedule over the new
    ``max_steps`` continues without a jump. Later, the cosine restarts from the rate in force (the one the old
    segment gives the next step, or its last step's for a finished run) and decays to ``min_lr_ratio`` at the new
    end.
    """
    if max_steps == int(segment["max_steps"]):
        return dict(segment)
    if kind != "cosine" or step <= warmup_steps:
        return {**schedule_segment(max_steps)}
    old_max = int(segment["max_steps"])
    current = segment_lr_factor(
        min(step, old_max - 1), segment=segment, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, kind=kind
    )
    return {"start_step": float(step), "start_factor": current, "max_steps": float(max_steps)}
