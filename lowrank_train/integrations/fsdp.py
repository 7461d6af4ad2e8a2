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
the new basis is then broadcast from the first rank so that the ranks agree bit for bit even if an SVD
routine were not deterministic (its quantized codes and the adaptive gap are then computed from identical
inputs everywhere). "random" and "identity" projectors are regenerated from the seed: no communication at
refresh time. The result equals single-process GaLore on the global batch up to the order of floating-point
sums. The non-finite check of every step all-reduces one flag per sharded gradient, so every rank skips or
refuses the same step.

All of this is :class:`FSDP2Backend`, the :class:`~lowrank_train.optim.backend.ProjectionBackend` that
:class:`FSDP2GaLore` hands to :class:`~lowrank_train.optim.GaLore`; nothing of GaLore is overridden.

Update rules (APOLLO, APOLLO-Mini, Fira; :mod:`lowrank_train.optim.update_rules`) run on the same pieces: the
seeded random projection is regenerated on every rank (no communication), APOLLO's ``G_k diag(s)`` and Fira's
residual ``G_k - P_k R`` are row-local, and the channel-wise ratio needs no communication either (a column of the
oriented projection is whole on every rank). What spans rows goes through :meth:`FSDP2Backend.sum_over_shards`:
the tensor-wise ratio of APOLLO-Mini when m > n (one all-reduce of two scalars) and the norm-growth limiter's
``||update||`` (one all-reduce of one scalar per weight and step).

Layer-wise steps (the GaLore 2 design, arXiv 2504.20437): torch's ``fully_shard`` runs the sharded parameter's
post-accumulate-grad hooks right after its reduce-scatter, so
:class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer` over the sharded parameters steps each one as soon as
its averaged shard exists and frees it; see :func:`fsdp2_layerwise`.

Supported placements: ``Shard(0)`` or ``Replicate()`` on every mesh dimension (FSDP2, HSDP). INT8 (Q-GaLore)
weights are not supported under FSDP2. Checkpoints are per rank:
``torch.save(optimizer.state_dict(), f"optim.rank{rank}.pt")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from lowrank_train.optim.backend import FRAMES, BasisBuild, DenseBackend
from lowrank_train.optim.functional import finite_flags
from lowrank_train.optim.galore import GaLore
from lowrank_train.optim.layerwise import LayerwiseOptimizer
from lowrank_train.projection import projects_rows


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
    return sum_over_row_shards(basis.to(local.dtype).mT @ local, grad)


def sum_over_row_shards(value: torch.Tensor, like: DTensor) -> torch.Tensor:
    """``value`` summed over the ranks holding the other row shards of ``like`` (not over its replicas).

    Args:
        value: a partial result on this rank (same shape on every rank), e.g. a squared norm of its rows.
        like: the row-sharded DTensor whose mesh and placements say which ranks hold other rows.

    Returns:
        The sum, identical on every rank; one all-reduce per sharded mesh dimension.
    """
    mesh = like.device_mesh
    placements = [Partial() if isinstance(p, Shard) else Replicate() for p in like.placements]
    summed = DTensor.from_local(value, mesh, placements, run_check=False)
    return summed.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()


def frame_is_split(param: torch.Tensor, frame: str) -> bool:
    """True when ``frame`` of ``param`` is spread over ranks: its rows ("weight") of a DTensor always; its
    oriented projection ("projected") only when the basis is on the unsharded side (m > n: r x m_k columns)."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if not is_sharded(param):
        return False
    return frame == "weight" or not projects_rows(param.shape)


def sharded_check(tensor: torch.Tensor, param: torch.Tensor, frame: str) -> tuple[bool, torch.Tensor]:
    """Whether ``tensor`` (a piece of ``param``'s gradient or projected gradient) is finite on every rank, and its
    squared norm over all ranks: one all-reduce of two floats where ``frame`` is split, none where it is whole.

    Args:
        tensor: a DTensor gradient or this rank's plain piece (e.g. a projected accumulator).
        param: the weight it belongs to.
        frame: "weight" or "projected" (see :func:`frame_is_split`).

    Returns:
        (finite everywhere, fp32 0-dim squared norm) — identical on every rank; one host synchronisation.
    """
    local = tensor.to_local() if is_sharded(tensor) else tensor
    bad = (~finite_flags([local])).to(torch.float32)[0]
    # A non-finite piece makes its squared norm non-finite too: it is only read once every rank is finite.
    values = torch.stack([bad, torch.linalg.vector_norm(local, dtype=torch.float32).square()])
    if frame_is_split(param, frame):
        values = sum_over_row_shards(values, param)
    return bool(values[0] == 0), values[1]


def broadcast_from_first(tensor: torch.Tensor, mesh: Any) -> None:
    """Overwrites ``tensor`` in place with its value on the first rank of every dimension of ``mesh``."""
    buffer = tensor.to(mesh.device_type)  # NCCL cannot send the CPU-resident integer state
    for dim in range(mesh.ndim):
        dist.broadcast(buffer, group=mesh.get_group(dim), group_src=0)
    tensor.copy_(buffer)


def sharded_finite_flags(grads: Sequence[DTensor]) -> torch.Tensor:
    """One "no NaN/Inf on any rank" flag per sharded gradient: one all-reduce per (mesh, placements) layout.

    Args:
        grads: DTensor gradients, sharded on dim 0 (or replicated) over their device meshes.

    Returns:
        (len(grads),) bool tensor on the first gradient's local device, the same on every rank.
    """
    device = grads[0].to_local().device
    bad = torch.zeros(len(grads), device=device)
    layouts: dict[tuple[int, tuple[Any, ...]], list[int]] = {}
    for i, grad in enumerate(grads):
        layouts.setdefault((id(grad.device_mesh), tuple(grad.placements)), []).append(i)
    for indices in layouts.values():
        first = grads[indices[0]]
        local = (~finite_flags([grads[i].to_local() for i in indices])).to(device, torch.float32)
        bad[indices] = sum_over_row_shards(local, first).to(device)
    return bad == 0


@dataclass(frozen=True)
class FSDP2Backend:
    """:class:`~lowrank_train.optim.backend.ProjectionBackend` for row-sharded DTensors (FSDP2, HSDP).

    Ordinary tensors in the same optimizer take :class:`~lowrank_train.optim.backend.DenseBackend`'s path.
    """

    dense: DenseBackend = DenseBackend()

    def check_param(self, param: torch.Tensor, label: str) -> None:
        if is_sharded(param):
            check_row_sharded(param, label)
        else:
            self.dense.check_param(param, label)

    def finite_flags(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        sharded = [i for i, g in enumerate(grads) if is_sharded(g)]
        if not sharded:
            return self.dense.finite_flags(grads)
        flags = sharded_finite_flags([grads[i] for i in sharded])  # every rank sees the same flags
        plain = [i for i in range(len(grads)) if i not in set(sharded)]
        if not plain:
            return flags
        merged = torch.ones(len(grads), dtype=torch.bool, device=flags.device)
        merged[sharded] = flags
        merged[plain] = self.dense.finite_flags([grads[i] for i in plain]).to(flags.device)
        return merged

    def projection_is_shared(self, param: torch.Tensor) -> bool:
        # Row side: P^T G is all-reduced, so a NaN in any shard reaches every rank; column side: this rank's own.
        return not is_sharded(param) or projects_rows(param.shape)

    def build_basis(self, param: torch.Tensor, build: BasisBuild) -> torch.Tensor:
        if not is_sharded(param):
            return self.dense.build_basis(param, build)
        # One m x n all-gather per refresh; every rank builds from the same matrix, and the first rank's basis is
        # broadcast so that the ranks agree bit for bit even if an SVD routine were not deterministic. What is
        # derived from it (quantized codes, the adaptive gap) is then computed from identical inputs everywhere.
        basis = build((param.grad if param.grad is not None else param).full_tensor())
        broadcast_from_first(basis, param.device_mesh)
        return basis

    def local_basis(self, basis: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return local_basis(basis, param) if is_sharded(param) else basis

    def project_gradient(self, grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        if is_sharded(grad):
            return project_sharded_gradient(grad, basis)
        return self.dense.project_gradient(grad, basis)

    def projected_shape(self, param: torch.Tensor, rank: int) -> tuple[int, int]:
        if not is_sharded(param):
            return self.dense.projected_shape(param, rank)
        # Rows side: the all-reduced r x n projection; columns side: this rank's r x m_k columns.
        return (rank, param.shape[1]) if projects_rows(param.shape) else (rank, param.to_local().shape[0])

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
        # ``update`` holds this rank's rows already (the basis was local); to_local() returns the shard, no copy.
        target = param.to_local() if is_sharded(param) else param
        self.dense.write_back(target, update, lr=lr, weight_decay=weight_decay, scale=scale, generator=generator)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if is_sharded(tensor) else tensor

    def sum_over_shards(self, value: torch.Tensor, param: torch.Tensor, frame: str) -> torch.Tensor:
        # The rows of a shard ("weight") are split; the projection ("projected") only when m > n (r x m_k columns).
        return sum_over_row_shards(value, param) if frame_is_split(param, frame) else value


class FSDP2GaLore(GaLore):
    """:class:`~lowrank_train.optim.GaLore` whose low-rank weights may be FSDP2 (row-sharded DTensor) parameters.

    Same arguments, math, state keys and presets as ``GaLore``: it only supplies :class:`FSDP2Backend` as the
    ``backend``. Ordinary tensors take the unchanged path, so the same optimizer also serves DDP or single-process
    runs. Plain (non-projected) DTensor parameters go to the base optimizer as they are (``torch.optim``
    optimizers support DTensors; bitsandbytes' 8-bit ones do not). Every update rule works (``update="apollo"``,
    ``"fira"``); the presets take the backend as a keyword: ``APOLLOAdamW(groups, backend=FSDP2Backend())``.

    Example:
        >>> for layer in model.model.layers:
        ...     fully_shard(layer)
        >>> fully_shard(model)
        >>> opt = FSDP2GaLore(lowrank_param_groups(model, rank=128), base="adamw", lr=1e-3)
    """

    def __init__(self, params: Iterable[Any], base: type[torch.optim.Optimizer] | str = "adamw", **defaults: Any):
        if "backend" in defaults:
            raise ValueError("FSDP2GaLore supplies its own backend (FSDP2Backend); use GaLore to pass another one")
        super().__init__(params, base, backend=FSDP2Backend(), **defaults)


def fsdp2_layerwise(
    params: Iterable[Any],
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    **engine_options: Any,
) -> LayerwiseOptimizer:
    """Layer-wise steps under FSDP2: a :class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer` over the sharded
    parameters of a model that ``fully_shard`` has wrapped already.

    Each shard is stepped inside backward right after its reduce-scatter (torch's ``fully_shard`` runs the sharded
    parameter's post-accumulate-grad hooks there) and its gradient freed: the GaLore 2 design (arXiv 2504.20437).
    ``make_optimizer`` builds the inner optimizer of one parameter; low-rank groups need a shard-aware GaLore
    (:class:`FSDP2GaLore`, or a preset given ``backend=FSDP2Backend()``), plain groups any ``torch.optim`` optimizer.

    Args:
        params: the model's parameters or param groups (e.g. ``lowrank_param_groups(model, ...)``), taken *after*
            ``fully_shard``.
        make_optimizer: as for ``LayerwiseOptimizer``, e.g.
            ``lambda groups: APOLLOAdamW(groups, lr=1e-2, backend=FSDP2Backend())``.
        **engine_options: ``accumulation_steps``, ``max_grad_norm``, ``clip_mode``, ``nonfinite``.

    Raises:
        ValueError: a parameter that is not a DTensor (the model was not sharded first, or the groups were taken
            before ``fully_shard`` replaced its parameters), or ``process_group`` given (FSDP2 does the averaging).

    Example:
        >>> for layer in model.model.layers:
        ...     fully_shard(layer)
        >>> fully_shard(model)
        >>> opt = fsdp2_layerwise(
        ...     lowrank_param_groups(model, rank=256),
        ...     lambda groups: APOLLOAdamW(groups, lr=1e-2, backend=FSDP2Backend()),
        ...     accumulation_steps=2,
        ... )
    """
    if "process_group" in engine_options:
        raise ValueError("fsdp2_layerwise: FSDP2 averages the gradients itself; do not pass process_group")
    groups = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in params]
    for group in groups:
        tensors = group["params"]
        group["params"] = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if not is_sharded(p):
                name = names[i] if names and i < len(names) else f"params[{i}]"
                raise ValueError(
                    f"fsdp2_layerwise: {name} (shape {tuple(p.shape)}) is not an FSDP2 (DTensor) parameter: apply "
                    "fully_shard to the model first and take its parameters (param groups) afterwards"
                )
    return LayerwiseOptimizer(groups, make_optimizer, **engine_options)


def state_placements(param: torch.Tensor, shape: Sequence[int], *, projected: bool) -> list[Any] | None:
    """How a tensor of the optimizer state of ``param`` is split over the ranks, in its *global* ``shape``, for
    resharding checkpoints (``torch.distributed.checkpoint``); ``None`` when every rank holds the same whole tensor.

    Args:
        param: the (row-sharded DTensor, or ordinary) parameter the state belongs to.
        shape: the state tensor's global shape.
        projected: the state is the inner optimizer's state of ``param``'s projected gradient (GaLore's shadow).

    Returns:
        The placements of ``param`` for state shaped like it (plain moments); ``Shard(1)`` (over ``param``'s mesh)
        for the (r x m) projected state of an m > n weight, whose r x m_k columns follow the weight's rows; ``None``
        for the rest: counters, bases, and the (r x n) projected state of an m <= n weight, which every rank holds
        whole after the projection's all-reduce.
    """
    if not is_sharded(param):
        return None
    if projected:
        if len(shape) == 2 and not projects_rows(param.shape) and shape[1] == param.shape[0]:
            return [Shard(1) if isinstance(p, Shard) else p for p in param.placements]
        return None
    return list(param.placements) if tuple(shape) == tuple(param.shape) else None


def projected_state_shape(local: torch.Tensor, param: torch.Tensor) -> tuple[int, ...]:
    """The global shape of this rank's ``local`` projected state of a sharded ``param``: its (r x m_k) columns of an
    m > n weight are part of an (r x m) tensor; any other state is the same on every rank (local = global)."""
    if not is_sharded(param) or local.dim() != 2 or projects_rows(param.shape):
        return tuple(local.shape)
    return (local.shape[0], param.shape[0]) if local.shape[1] == param.to_local().shape[0] else tuple(local.shape)
