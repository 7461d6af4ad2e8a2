"""Update rules: how a low-rank step turns the inner optimizer's projected update into the full weight update.

GaLore's wrapper projects each gradient G (m x n) to R = P^T G (r x max(m, n), oriented frame), lets the inner
optimizer turn R into its update R~ (same shape, learning rate and sign included), and then asks the group's rule
for the m x n update that is written back (times the group's ``scale``, the papers' alpha):

=============  ==============================================================================================
``"galore"``   ``P R~`` (Zhao et al. 2024, arXiv 2403.03507): today's behaviour, bit for bit
``"apollo"``   ``G diag(s)`` with ``s_j = ||R~_:,j|| / ||R_:,j||`` per channel (or one tensor-wise ``s``), then the
               norm-growth limiter (APOLLO, Zhu et al. 2024, arXiv 2412.05270, Alg. 1)
``"fira"``     ``P R~ + (I - P P^T) G diag(phi)`` with the same ratio ``phi``; the limiter acts on the residual
               part (Fira, Chen et al. 2024, arXiv 2410.01623, Sec. 3.2-3.3)
=============  ==============================================================================================

A channel is a column of the oriented frame: the non-projected side (n when m <= n, m otherwise), as in the
papers. Each entry carries the facts the wrapper asks instead of comparing names: ``needs_full_gradient`` (the raw
G must exist at update time, so projected-space accumulation is refused), its default ``norm_growth_limit`` and
``sharded`` (it runs on row shards, below).

Sharded weights (FSDP2): a rule sees only this process's pieces (its rows of G and of the update, its part of R and
R~, its rows of P when m <= n) and a ``reduce(value, frame)`` callable, the backend's
:meth:`~lowrank_train.optim.backend.ProjectionBackend.sum_over_shards`, which sums a partial value over the
processes (identity for an ordinary tensor). The rules stay pure; what each needs summed:

==================================  ==========================================================================
channel-wise ratio (APOLLO, Fira)   nothing: a column of the oriented projection is whole on every process
                                    (m <= n: R is all-reduced, identical everywhere; m > n: column j of R is
                                    row j of G, held by one process)
tensor-wise ratio (APOLLO-Mini)     ``||R~||^2`` and ``||R||^2`` in the ``"projected"`` frame: one all-reduce of
                                    two scalars when m > n (R is split by columns there), nothing when m <= n
norm-growth limiter (any rule)      ``||update||^2`` in the ``"weight"`` frame: one all-reduce of one scalar
Fira's residual, APOLLO's G s       nothing: row-local (``G_k - P_k R``, ``G_k - (G_k Q) Q^T``, ``G_k diag(s)``)
==================================  ==========================================================================

Orientation is always decided from ``weight_shape`` (the full weight's), never from a piece's shape: a 40 x 24
weight split in two holds 20 x 24 rows, which on its own would orient the other way.

State written by a rule (a tensor under a documented key, merged into ``optimizer.state[p]``):

=================  ======================================================================
``update_norm``    fp32 0-dim, on the parameter's device: the norm of the last limited update divided by the
                   learning rate (the limiter's ``||update_{t-1}||``); absent before the first limited step
=================  ======================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_train._registry import Registry
from lowrank_train.optim.functional import ScaledGradient
from lowrank_train.projection.ops import project_back, projects_rows

SCALE_TYPES = ("channel", "tensor")
_RATIO_EPS = 1e-8  # keeps a zero-gradient channel's scale finite (APOLLO's and Fira's reference code use 1e-8)

UpdateFn = Callable[..., "tuple[torch.Tensor | ScaledGradient, dict[str, torch.Tensor]]"]
"""``apply(grad, low, low_update, basis, state, *, weight_shape, lr, scale_type, norm_growth_limit[, reduce])
-> (update (m x n) or a ScaledGradient, new state entries)``; see :func:`galore_update` for the arguments."""

Reduce = Callable[[torch.Tensor, str], torch.Tensor]
"""``reduce(value, frame)``: ``value`` summed over the pieces of a sharded weight (frame "weight" or "projected")."""


@dataclass(frozen=True)
class UpdateRule:
    """A registered update rule, with the facts the wrapper asks instead of its name.

    Attributes:
        name: registry key (the ``update`` group option).
        apply: the pure function (:data:`UpdateFn`).
        needs_full_gradient: the rule reads the raw m x n gradient at update time, so a projected accumulator
            (``GaLore.accumulate_grad``) cannot serve it.
        norm_growth_limit: default gamma of the norm-growth limiter (``None``: off) when the group's
            ``norm_growth_limit`` is ``None``.
        state_keys: the ``optimizer.state[p]`` entries the rule writes (all 0-dim fp32 tensors).
        sharded: ``apply`` takes the ``reduce`` keyword and sums every quantity that spans more than one row of the
            weight through it, so it runs on FSDP2 row shards; a rule without it is refused for a sharded weight.
    """

    name: str
    apply: UpdateFn
    needs_full_gradient: bool = False
    norm_growth_limit: float | None = None
    state_keys: tuple[str, ...] = ()
    sharded: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"an update rule name is a non-empty string, got {self.name!r}")
        if not callable(self.apply):
            raise ValueError(f"update rule {self.name!r}: apply must be callable, got {self.apply!r}")
        object.__setattr__(self, "state_keys", tuple(self.state_keys))

    def growth_limit(self, group: Mapping[str, Any]) -> float | None:
        """The gamma a group uses: its ``norm_growth_limit``, else this rule's default; ``None`` (or inf) is off."""
        gamma = group.get("norm_growth_limit")
        gamma = self.norm_growth_limit if gamma is None else gamma
        return None if gamma is None or math.isinf(gamma) else gamma


UPDATE_RULES: Registry[UpdateRule] = Registry("update rule", UpdateRule)


def register_update_rule(rule: UpdateRule, *, replace: bool = False) -> UpdateRule:
    """Adds ``rule`` to the registry under ``rule.name`` and returns it.

    Raises:
        ValueError: when the name is taken and ``replace`` is False, or ``rule`` is not an UpdateRule.
    """
    return UPDATE_RULES.add(rule, replace=replace)


def get_update_rule(name: str) -> UpdateRule:
    """Looks an update rule up by name.

    Raises:
        ValueError: when ``name`` is not registered; the message lists the known names.
    """
    return UPDATE_RULES.lookup(name)


# ----- pure pieces --------------------------------------------------------------------------------------------
def _sq_norm(tensor: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor.float(), dim=dim, keepdim=dim is not None).square()


def norm_ratio(
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    scale_type: str,
    reduce: Reduce | None = None,
    denominator_scale: float = 1.0,
) -> torch.Tensor:
    """``||numerator_:,j|| / (c ||denominator_:,j|| + 1e-8)`` per column (``"channel"``), or of whole tensors.

    Args:
        numerator: (r, k) tensor (the inner update R~), or this process's columns of it.
        denominator: (r, k) tensor (the projected gradient R), the same columns.
        scale_type: "channel" (one ratio per column) or "tensor".
        reduce: sums the tensor-wise squared norms over the processes (``"projected"`` frame); ``None`` for a
            whole tensor. A column is never split, so the channel-wise ratio needs no sum.
        denominator_scale: c, applied to the norms (not to the tensor: no (r, k) copy).

    Returns:
        fp32 (1, k) for "channel", 0-dim for "tensor".
    """
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    if scale_type == "tensor":
        if reduce is not None:
            top, bottom = reduce(torch.stack([_sq_norm(numerator), _sq_norm(denominator)]), "projected").sqrt()
            return top / (bottom * denominator_scale + _RATIO_EPS)
        return torch.linalg.vector_norm(numerator.float()) / (
            torch.linalg.vector_norm(denominator.float()) * denominator_scale + _RATIO_EPS
        )
    # Column norms as sqrt(sum of squares): several times faster on the CPU than vector_norm(dim=0) (issue 21).
    top = numerator.float().square().sum(dim=0, keepdim=True).sqrt_()
    bottom = denominator.float().square().sum(dim=0, keepdim=True).sqrt_()
    if denominator_scale != 1.0:
        bottom.mul_(denominator_scale)
    return top.div_(bottom.add_(_RATIO_EPS))


def limit_norm_growth(
    update: torch.Tensor,
    previous: torch.Tensor | None,
    gamma: float,
    lr: float | torch.Tensor,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter (arXiv 2410.01623 Sec. 3.3, also APOLLO Alg. 1).

    If ``||update_t|| > gamma ||update_{t-1}||`` the update is rescaled to norm ``gamma ||update_{t-1}||``. Norms are
    taken of ``update / lr``: the papers limit the update before the learning rate multiplies it, so a warm-up
    schedule is not capped at gamma per step. No host synchronisation.

    Args:
        update: (m, n) update, learning rate included.
        previous: 0-dim fp32, the last limited ``||update / lr||``; ``None`` on the first step (nothing to limit).
        gamma: largest allowed growth factor (>= 1).
        lr: the learning rate that ``update`` includes (> 0).
        reduce: sums ``||update||^2`` over the processes holding the other rows (``"weight"`` frame); ``None`` for
            a whole weight.

    Returns:
        The (possibly rescaled) update and its 0-dim fp32 ``||update / lr||``, the next step's ``previous``.
    """
    if reduce is None:
        norm = torch.linalg.vector_norm(update.float()) / lr
    else:
        norm = reduce(_sq_norm(update), "weight").sqrt() / lr
    if previous is None:
        return update, norm
    factor = (norm / (previous.to(norm.device) + _RATIO_EPS)).clamp(min=gamma) / gamma
    return update / factor, norm / factor


def _limited(
    update: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    gamma: float | None,
    lr: float | torch.Tensor,
    reduce: Reduce | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if gamma is None or (not torch.is_tensor(lr) and lr == 0):  # lr 0: a zero update, nothing to measure
        return update, {}
    update, norm = limit_norm_growth(update, state.get("update_norm"), gamma, lr, reduce)
    return update, {"update_norm": norm}


def _to_weight_frame(oriented: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    return oriented if projects_rows(weight_shape) else oriented.mT


def _oriented(grad: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    # By the full weight's shape: a shard's own shape may orient the other way.
    return grad if projects_rows(weight_shape) else grad.mT


# ----- the rules ----------------------------------------------------------------------------------------------
def galore_update(
    grad: torch.Tensor | None,
    low: torch.Tensor,
    low_update: torch.Tensor,
    basis: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    *,
    weight_shape: torch.Size,
    lr: float | torch.Tensor,
    scale_type: str,
    norm_growth_limit: float | None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GaLore: the inner update projected back, ``P R~`` (with an optional norm-growth limiter).

    Args:
        grad: (m, n) raw gradient (unused here; may be ``None`` after projected accumulation); for a sharded
            weight, this process's rows of it.
        low: (r, max(m, n)) projected gradient R (for a sharded weight: the backend's ``projected_shape``).
        low_update: (r, max(m, n)) inner optimizer's update R~ (learning rate and sign included).
        basis: (min(m, n), r) basis P (for a sharded weight: the backend's ``local_basis``).
        state: the parameter's state (read only).
        weight_shape: (m, n).
        lr: the group's learning rate (for the limiter).
        scale_type: unused by this rule.
        norm_growth_limit: gamma, or ``None`` for no limiter (GaLore's default).
        reduce: sums partial values over the pieces of a sharded weight (see the module docstring); ``None`` for
            a whole weight.

    Returns:
        The (m, n) update (before ``scale``; this process's rows of it) and the state entries to store.
    """
    del grad, low, scale_type
    update = project_back(low_update, basis, weight_shape)
    return _limited(update, state, norm_growth_limit, lr, reduce)


def apollo_update(
    grad: torch.Tensor | None,
    low: torch.Tensor,
    low_update: torch.Tensor,
    basis: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    *,
    weight_shape: torch.Size,
    lr: float | torch.Tensor,
    scale_type: str,
    norm_growth_limit: float | None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """APOLLO (arXiv 2412.05270 Sec. 4, Alg. 1): the raw gradient scaled by ``||R~|| / ||R||`` per channel.

    The paper's projection has N(0, 1/r) entries (E[P P^T] = I, so ``||R_:,j|| ~ ||G_:,j||``); ours have
    E[P^T P] = I (:func:`lowrank_train.projection.random_basis`), i.e. ``R`` is ``sqrt(r / min(m, n))`` times the
    paper's. ``R`` is put back into the paper's normalisation before the ratio (Adam's R~ does not depend on it),
    so the scales, ``scale`` (alpha) and the learning rate mean what they mean in the paper.

    Args: as :func:`galore_update`; ``grad`` is required, ``scale_type`` is "channel" (APOLLO) or "tensor"
    (APOLLO-Mini).
    """
    if grad is None:
        raise ValueError("the 'apollo' update rule needs the raw gradient at update time")
    rows, rank = min(weight_shape), basis.shape[1]  # a shard's basis has fewer rows: the full count normalises
    # R~ carries -lr: the ratio is >= 0, so the negated scales point downhill (folded in: no extra pass).
    scales = norm_ratio(low_update, low, scale_type, reduce, denominator_scale=math.sqrt(rows / rank)).neg_()
    # The limiter's norm comes from G's norms (||G diag(s)||^2 = sum_j s_j^2 ||G_:,j||^2) and its factor divides the
    # scales, so G s is never formed here: the write-back fuses it (ScaledGradient, issue 21 item 4).
    if scales.dim() == 0:
        scales, new_state = _limited_scalar(grad, scales, state, norm_growth_limit, lr, reduce)
        return ScaledGradient(grad, scales.reshape(1, 1)), new_state
    scales, new_state = _limited_scales(grad, scales, state, norm_growth_limit, lr, weight_shape, reduce)
    return ScaledGradient(grad, _to_weight_frame(scales, weight_shape)), new_state


def _growth_factor(
    sq_norm: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    gamma: float,
    lr: float | torch.Tensor,
    reduce: Reduce | None,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The limiter's divisor (``None`` on the first step) from this piece's ``||update||^2``, summed over the rows
    other processes hold (``"weight"`` frame), and the state entry to store."""
    if reduce is not None:
        sq_norm = reduce(sq_norm, "weight")
    norm = sq_norm.sqrt() / lr
    previous = state.get("update_norm")
    if previous is None:
        return None, {"update_norm": norm}
    factor = (norm / (previous.to(norm.device) + _RATIO_EPS)).clamp(min=gamma) / gamma
    return factor, {"update_norm": norm / factor}


def _limited_scales(
    grad: torch.Tensor,
    scales: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    gamma: float | None,
    lr: float | torch.Tensor,
    weight_shape: torch.Size,
    reduce: Reduce | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`limit_norm_growth` of ``oriented(grad) * scales`` ((1, k) ``scales``) without forming it."""
    if gamma is None or (not torch.is_tensor(lr) and lr == 0):
        return scales, {}
    # The channels' norms, each the fastest way on the CPU: down the rows as a sum of squares, along a row by norm.
    if projects_rows(weight_shape):
        columns = grad.float().square().sum(dim=0)
    else:
        columns = torch.linalg.vector_norm(grad, dim=1, dtype=torch.float32).square_()
    factor, new_state = _growth_factor((columns * scales.squeeze(0).square()).sum(), state, gamma, lr, reduce)
    return (scales if factor is None else scales / factor), new_state


def _limited_scalar(
    grad: torch.Tensor,
    scale: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    gamma: float | None,
    lr: float | torch.Tensor,
    reduce: Reduce | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`limit_norm_growth` of ``grad * scale`` (0-dim ``scale``) without forming it: the factor divides it."""
    if gamma is None or (not torch.is_tensor(lr) and lr == 0):
        return scale, {}
    sq_norm = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
    factor, new_state = _growth_factor(sq_norm * scale.square(), state, gamma, lr, reduce)
    return (scale if factor is None else scale / factor), new_state


def fira_update(
    grad: torch.Tensor | None,
    low: torch.Tensor,
    low_update: torch.Tensor,
    basis: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    *,
    weight_shape: torch.Size,
    lr: float | torch.Tensor,
    scale_type: str,
    norm_growth_limit: float | None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fira (arXiv 2410.01623 Sec. 3.2-3.3): ``P R~`` plus the residual ``(I - P P^T) G`` scaled by ``phi``.

    ``phi_j = ||R~_:,j|| / ||R_:,j||`` per channel (or tensor-wise); the norm-growth limiter acts on the scaled
    residual only, as in the paper.

    Args: as :func:`galore_update`; ``grad`` is required.
    """
    if grad is None:
        raise ValueError("the 'fira' update rule needs the raw gradient at update time")
    p = basis.float()
    residual = _oriented(grad, weight_shape).float() - p @ low.float()  # (I - P P^T) G, since R = P^T G
    # R~ carries -lr: the residual step goes downhill
    residual.mul_(norm_ratio(low_update, low, scale_type, reduce)).neg_()
    residual, new_state = _limited(_to_weight_frame(residual, weight_shape), state, norm_growth_limit, lr, reduce)
    return project_back(low_update, basis, weight_shape).float() + residual, new_state


register_update_rule(UpdateRule("galore", galore_update, state_keys=("update_norm",), sharded=True))
register_update_rule(
    UpdateRule(
        "apollo",
        apollo_update,
        needs_full_gradient=True,
        norm_growth_limit=1.01,
        state_keys=("update_norm",),
        sharded=True,
    )
)
register_update_rule(
    UpdateRule(
        "fira",
        fira_update,
        needs_full_gradient=True,
        norm_growth_limit=1.01,
        state_keys=("update_norm",),
        sharded=True,
    )
)

__all__ = [
    "SCALE_TYPES",
    "UPDATE_RULES",
    "Reduce",
    "UpdateRule",
    "apollo_update",
    "fira_update",
    "galore_update",
    "get_update_rule",
    "limit_norm_growth",
    "norm_ratio",
    "register_update_rule",
]
