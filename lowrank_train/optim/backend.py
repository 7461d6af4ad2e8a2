"""The seam between GaLore's math and the way a parameter is stored (ordinary tensor, FSDP2 shard, ...).

:class:`~lowrank_train.optim.GaLore` does everything that is the same for every layout itself: refresh policy,
quantized bases, the inner optimizer on zero-size shadow parameters, the step counters. The few operations that
change when a weight is split over processes go through a :class:`ProjectionBackend` passed to its constructor
(issue 11 item 4: composition, not overriding private methods):

================================  ====================================================================
``check_param``                   refuses a parameter this backend cannot step (at ``add_param_group``)
``finite_flags``                  one "no NaN/Inf" flag per gradient, the same on every process
``projection_is_shared``          whether a weight's projection is the same on every process, so the step may
                                  check it instead of the gradient (one pass over G, not two)
``build_basis``                   builds the full basis at a refresh from the full gradient, identical everywhere
``local_basis``                   the part of the full basis this process's piece of the weight uses
``project_gradient``              the projected gradient (r x max(m, n), or this process's columns of it)
``projected_shape``               the shape ``project_gradient`` returns (checked when a state is loaded)
``write_back``                    adds the projected-back update to the weight (or to this process's piece)
``local``                         this process's piece of a weight-shaped tensor (a gradient) as a plain tensor
``sum_over_shards``               sums a partial value (a squared norm) over the processes holding the other
                                  pieces of a frame: ``"weight"`` (rows of the m x n weight) or ``"projected"``
                                  (columns of the oriented r x max(m, n) projection)
================================  ====================================================================

The update rules (:mod:`lowrank_train.optim.update_rules`) stay pure functions of local pieces: every quantity that
spans more than one row of a weight (a tensor-wise norm, the norm-growth limiter's norm) is summed through
``sum_over_shards``, which is the identity here and one scalar all-reduce for an FSDP2 shard.

:class:`DenseBackend` is the default, for ordinary tensors;
:class:`lowrank_train.integrations.fsdp.FSDP2Backend` handles row-sharded DTensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from lowrank_train.optim.functional import apply_weight_update, finite_flags
from lowrank_train.projection import project_gradient

# Builds the (min(m, n) x r) fp32 basis from a plain (m x n) matrix: GaLore binds projector, rank and seed.
BasisBuild = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class ProjectionBackend(Protocol):
    """The layout-dependent operations of a GaLore step (see the module docstring)."""

    def check_param(self, param: torch.Tensor, label: str) -> None:
        """Raises ``ValueError`` (naming ``label``) for a low-rank parameter this backend cannot step."""
        ...

    def finite_flags(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """(len(grads),) bool tensor, True where a gradient holds no NaN/Inf; no host synchronisation."""
        ...

    def projection_is_shared(self, param: torch.Tensor) -> bool:
        """True when ``project_gradient`` of ``param``'s gradient is the same on every process (or there is one),
        so checking it for NaN/Inf (instead of the gradient) gives every process the same answer."""
        ...

    def build_basis(self, param: torch.Tensor, build: BasisBuild) -> torch.Tensor:
        """``build`` applied to the full (m x n) gradient of ``param`` (its values when it has none)."""
        ...

    def local_basis(self, basis: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The rows of the full (min(m, n) x r) ``basis`` that this process's piece of ``param`` uses."""
        ...

    def project_gradient(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Projection of ``grad`` on the ``local_basis``, in the oriented (r x ...) frame."""
        ...

    def projected_shape(self, param: torch.Tensor, rank: int) -> tuple[int, int]:
        """Shape of ``project_gradient``'s result (and of the inner optimizer's state) for ``param``."""
        ...

    def write_back(
        self,
        param: torch.Tensor,
        update: torch.Tensor,
        *,
        lr: float | torch.Tensor,
        weight_decay: float,
        scale: float,
        generator: torch.Generator | None,
    ) -> None:
        """Adds ``update`` (already projected back, this process's rows) to ``param`` (see ``apply_weight_update``)."""
        ...

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's piece of a weight-shaped tensor (``param`` or its gradient) as an ordinary tensor."""
        ...

    def sum_over_shards(self, value: torch.Tensor, param: torch.Tensor, frame: str) -> torch.Tensor:
        """``value`` (a partial sum computed on this process's piece) summed over the pieces of ``param``.

        Args:
            value: a tensor of partial sums (e.g. a 0-dim squared norm), the same shape on every process.
            param: the weight whose pieces the sum runs over.
            frame: ``"weight"`` (a tensor of the weight's (m, n) frame, this process's rows) or ``"projected"``
                (the oriented (r, max(m, n)) projection, :meth:`projected_shape`); a frame that every process
                holds whole is not summed.
        """
        ...


FRAMES = ("weight", "projected")


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked by name: no distributed import needed)."""
    return any(cls.__name__ == "DTensor" for cls in type(tensor).__mro__)


@dataclass(frozen=True)
class DenseBackend:
    """Ordinary (unsharded) tensors: single process, DDP, or any wrapper that all-reduces full gradients."""

    def check_param(self, param: torch.Tensor, label: str) -> None:
        if is_dtensor(param):
            raise ValueError(
                f"{label} is an FSDP2-sharded DTensor: use lowrank_train.integrations.fsdp.FSDP2GaLore "
                "(same arguments) for sharded models, or give a preset backend=FSDP2Backend() (same module)"
            )

    def finite_flags(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        return finite_flags(grads)

    def projection_is_shared(self, param: torch.Tensor) -> bool:
        return True

    def build_basis(self, param: torch.Tensor, build: BasisBuild) -> torch.Tensor:
        # Between refreshes an accumulated step may have no .grad left; the builders then see the weight itself.
        return build(param.grad if param.grad is not None else param)

    def local_basis(self, basis: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return basis

    def project_gradient(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return project_gradient(grad, basis)

    def projected_shape(self, param: torch.Tensor, rank: int) -> tuple[int, int]:
        return rank, max(param.shape)

    def write_back(
        self,
        param: torch.Tensor,
        update: torch.Tensor,
        *,
        lr: float | torch.Tensor,
        weight_decay: float,
        scale: float,
        generator: torch.Generator | None,
    ) -> None:
        apply_weight_update(param, update, lr=lr, weight_decay=weight_decay, scale=scale, generator=generator)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def sum_over_shards(self, value: torch.Tensor, param: torch.Tensor, frame: str) -> torch.Tensor:
        return value  # one process holds the whole weight
