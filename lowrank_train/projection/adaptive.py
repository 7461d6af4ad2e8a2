"""Layer-adaptive lazy refresh of projection bases (Q-GaLore, Zhang et al. 2024, Sec. 3.4; issue 3 part 3).

After every refresh the optimizer measures how far the subspace moved with :func:`subspace_overlap`
(``||P_old^T P_new||_F^2 / r``, invariant to rotations and sign flips inside either basis, unlike Q-GaLore's
first-vector cosine) and keeps the last ``history`` values. Once the history is full, a mean at or above
``threshold`` multiplies the layer's gap by ``growth`` (up to ``max_gap``); a mean below it divides the gap by
``growth`` (down to the base gap), so a layer whose subspace starts moving again is refreshed more often
(Q-GaLore's package only ever grows the gap).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def validate_adaptive_options(threshold: float, growth: float, history: int, base_gap: int, max_gap: int) -> None:
    """Raises ``ValueError`` for options the adaptive policy cannot use.

    Args:
        threshold: mean similarity at or above which the gap grows; must lie in (0, 1].
        growth: factor applied to the gap; must be > 1.
        history: number of similarities averaged; must be an int >= 1.
        base_gap: the group's ``update_gap`` (the smallest gap).
        max_gap: the largest gap; must be >= ``base_gap``.
    """
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"refresh_threshold must lie in (0, 1], got {threshold!r}")
    if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth > 1):
        raise ValueError(f"refresh_growth must be a finite number > 1, got {growth!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"refresh_history must be an integer >= 1, got {history!r}")
    if isinstance(max_gap, bool) or not isinstance(max_gap, int) or max_gap < base_gap:
        raise ValueError(f"max_update_gap must be an integer >= update_gap ({base_gap}), got {max_gap!r}")


def push_similarity(history: Tensor, similarity: float) -> Tensor:
    """Appends ``similarity`` to a fixed-length history, dropping the oldest entry.

    Args:
        history: ``(k,)`` fp32 tensor; NaN marks entries not measured yet.
        similarity: the newest measurement.

    Returns:
        New ``(k,)`` tensor.
    """
    return torch.cat((history[1:], history.new_tensor([similarity])))


def next_refresh_gap(
    history: Tensor, gap: int, *, base_gap: int, max_gap: int, threshold: float, growth: float
) -> int:
    """The gap to use after a refresh, given the similarity history.

    Args:
        history: ``(k,)`` similarities, NaN where not measured yet.
        gap: current gap.
        base_gap: smallest gap (the group's ``update_gap``).
        max_gap: largest gap.
        threshold: grow when the mean similarity is at or above it.
        growth: factor to grow or shrink by.

    Returns:
        The unchanged ``gap`` while the history is not full; otherwise the grown or shrunk gap.
    """
    if bool(history.isnan().any()):
        return gap
    if float(history.mean()) >= threshold:
        return min(max_gap, max(gap + 1, int(gap * growth)))
    return max(base_gap, int(gap / growth))
