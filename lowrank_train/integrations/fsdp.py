"""GaLore on FSDP2 (``torch.distributed.fsdp.fully_shard``): projections of row-sharded DTensor gradients.

FSDP2 keeps every parameter as a DTensor sharded on dim 0: rank k holds rows ``W_k`` (m_k x n) of an (m x n)
weight and, after backward, the matching rows ``G_k`` of the averaged gradient. GaLore's projection side
decides whether a step needs communication:

* m > n, basis Q (n x r) on the *unsharded* column side: ``R_k = G_k Q`` and the update rows ``N_k Q^T`` are
  local. The inner optimizer's state (r x m_k) is sharded like the weight.
* m <= n, basis P (m x r) on the *sharded* row side: ``R = P^T G = sum_k P_k^T G_k`` needs one all-reduce
  of r x n floats; each rank then runs the inner optimizer on the same R (its r x n state is replicated) and
  writes back its own rows ``P_k N``.

A basis refresh all-gathers the gradient (``DTensor.full_tensor``, one m x n all-gather every ``update_gap``
steps, about one FSDP forward all-gather of that weight) and every rank builds the basis from the same matrix;
the stored basis is then broadcast from the first rank so that the ranks agree bit for bit even if an SVD
routine were not deterministic. "random" and "identity" projectors are regenerated from the seed: no
communication at refresh time. The result equals single-process GaLore on the global batch up to the order of
floating-point sums.

Supported placements: ``Shard(0)`` or ``Replicate()`` on every mesh dimension (FSDP2, HSDP). Layer-wise
stepping (:class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer`) and INT8 (Q-GaLore) weights are not
supported under FSDP2. Checkpoints are per rank: ``torch.save(optimizer.state_dict(), f"optim.rank{rank}.pt")``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from lowrank_train.optim.functional import refresh_due
from lowrank_train.optim.galore import GaLore
from lowrank_train.projection import get_projector, projects_rows

# Tensors of a GaLore state that every rank must hold identically after a refresh.
_REPLICATED_STATE = ("basis", "basis_codes", "basis_scales", "gap", "similarity")


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient)."""
    return isinstance(tensor, DTensor)


def check_row_sharded(param: DTensor, label: str = "parameter") -> None:
    """Checks that ``param`` is split on dim 0 only (FSDP2 / HSDP), the layout this module handles.

    Raises:
        ValueError: for any other placement (column sharding from tensor parallelism, partial values).
    """
    bad = [p for p in param.placements if not (isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0))]
    if bad:
        raise ValueError(
            f"{label} has placements {param.placements}: FSDP2 GaLore handles Shard(0) and Replicate() only "
            "(fully_shard / HSDP). Tensor-parallel layouts are not supported"
        )


def local_basis(basis: torch.Tensor, param: DTensor) -> torch.Tensor:
    """The part of a full basis this rank's rows of ``param`` use.

    Args:
        basis: (min(m, n), r) basis of the (m x n) weight, identical on every rank.
        param: the row-sharded weight (or its gradient).

    Returns:
        (m_k, r) rows of the basis when it spans the sharded row side (m <= n), else ``basis`` itself (n x r).
    """
    if not projects_rows(param.shape):
        return basis
    replicated = DTensor.from_local(basis, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)
    # Replicate -> Shard(0) is a local slice with the same chunking as the weight's rows: no communication.
    return replicated.redistribute(param.device_mesh, param.placements).to_local()


def project_sharded_gradient(grad: DTensor, basis: torch.Tensor) -> torch.Tensor:
    """GaLore projection of a row-sharded (m x n) gradient, in the oriented frame of :func:`project_gradient`.

    Args:
        grad: (m, n) DTensor gradient sharded on dim 0.
        basis: this rank's basis from :func:`local_basis`: (m_k, r) when m <= n, (n, r) when m > n.

    Returns:
        (r, n) projection ``P^T G``, summed over the shards (one all-reduce) and identical on every rank, when
        m <= n; this rank's (r, m_k) columns of ``(G Q)^T`` when m > n (no communication).
    """
    local = grad.to_local()
    if not projects_rows(grad.shape):
        return basis.to(local.dtype).mT @ local.mT
    partial = basis.to(local.dtype).mT @ local
    mesh = grad.device_mesh
    placements = [Partial() if isinstance(p, Shard) else Replicate() for p in grad.placements]
    summed = DTensor.from_local(partial, mesh, placements, run_check=False)
    return summed.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()


def broadcast_from_first(tensor: torch.Tensor, mesh: Any) -> None:
    """Overwrites ``tensor`` in place with its value on the first rank of every dimension of ``mesh``."""
    buffer = tensor.to(mesh.device_type)  # NCCL cannot send the CPU-resident integer state
    for dim in range(mesh.ndim):
        dist.broadcast(buffer, group=mesh.get_group(dim), group_src=0)
    tensor.copy_(buffer)


def count_nonfinite(grad: DTensor) -> int:
    """Number of NaN/Inf entries of a sharded gradient over all ranks (one all-reduce)."""
    local = (~grad.to_local().isfinite()).sum().to(torch.float32).reshape(1)
    mesh = grad.device_mesh
    placements = [Partial() if isinstance(p, Shard) else Replicate() for p in grad.placements]
    total = DTensor.from_local(local, mesh, placements, run_check=False)
    return int(total.redistribute(mesh, [Replicate()] * mesh.ndim).to_local().item())


class FSDP2GaLore(GaLore):
    """:class:`~lowrank_train.optim.GaLore` whose low-rank weights may be FSDP2 (row-sharded DTensor) parameters.

    Same arguments, math, state keys and presets as ``GaLore``; ordinary tensors take the unchanged path, so
    the same optimizer also serves DDP or single-process runs. Plain (non-projected) DTensor parameters go to
    the base optimizer as they are (``torch.optim`` optimizers support DTensors; bitsandbytes' 8-bit ones do
    not).

    Example:
        >>> for layer in model.model.layers:
        ...     fully_shard(layer)
        >>> fully_shard(model)
        >>> opt = FSDP2GaLore(lowrank_param_groups(model, rank=128), base="adamw", lr=1e-3)
    """

    _supports_dtensor = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            if is_sharded(p) and self.is_lowrank(p):
                names = group.get("param_names")
                check_row_sharded(p, names[i] if names else f"params[{i}]")

    def _check_refresh_inputs(self, todo: list[tuple[torch.Tensor, dict[str, Any], int]]) -> None:
        super()._check_refresh_inputs([item for item in todo if not is_sharded(item[0])])
        for p, group, _ in todo:
            if not is_sharded(p) or p.grad is None or not get_projector(group["projector"]).uses_gradient:
                continue
            state = self.state.get(p)
            if state and not refresh_due(int(state["step"]), int(state["last_refresh"]), int(state["gap"])):
                continue
            if count_nonfinite(p.grad):  # every rank sees the same total, so every rank raises
                raise ValueError(
                    f"non-finite gradient (NaN/Inf) where a projection basis was due for a refresh: "
                    f"{self._locate(p)[2]}. The basis was not rebuilt and no parameter was updated"
                )

    def _basis(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's view of the basis (see :func:`local_basis`), refreshed from the full gradient when due."""
        if not is_sharded(param):
            return super()._basis(param, group, state)
        kind = get_projector(group["projector"])
        due = refresh_due(int(state["step"]), int(state["last_refresh"]), int(state["gap"]))
        if due and kind.uses_gradient:
            # GaLore._basis reads only the values (through .grad, else the tensor itself) and the shape of its
            # argument: hand it the all-gathered (m x n) gradient as a plain tensor.
            matrix = (param.grad if param.grad is not None else param).full_tensor()
        else:
            # Between refreshes (and for seeded projectors) only the shape and device matter: a stride-0 view.
            matrix = torch.zeros((), device=param.device).expand(param.shape)
        refreshes = int(state["refreshes"])
        basis = super()._basis(matrix, group, state)
        if kind.stores_basis and int(state["refreshes"]) != refreshes:
            for key in _REPLICATED_STATE:
                if key in state:
                    broadcast_from_first(state[key], param.device_mesh)
            basis = self._load_basis(state, group, matrix)
        return local_basis(basis, param)

    def _take_projected_grad(
        self, param: torch.Tensor, state: dict[str, torch.Tensor], basis: torch.Tensor
    ) -> torch.Tensor:
        if not is_sharded(param):
            return super()._take_projected_grad(param, state, basis)
        low = state.pop("grad_accum", None)
        if param.grad is not None:
            projected = project_sharded_gradient(param.grad, basis)
            low = projected if low is None else low.add_(projected)
        return low

    def _write_back(
        self, param: torch.Tensor, update: torch.Tensor, group: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> None:
        # ``update`` already holds this rank's rows (the basis was local); write them into the local shard, which
        # to_local() returns without a copy.
        super()._write_back(param.to_local() if is_sharded(param) else param, update, group, state)
