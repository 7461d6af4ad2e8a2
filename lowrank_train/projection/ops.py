"""Projecting a gradient onto a basis and an update back: tensors in, tensors out.

GaLore projects on the smaller side of an (m x n) gradient G: R = P^T G (r x n) when m <= n, else
R = G Q (m x r). Both are the same operation on the *oriented* matrix (G, or G^T when m > n), so the
code has a single path; the projected tensor stays in the oriented frame (r x max(m, n)).
"""

from __future__ import annotations

import torch


def projects_rows(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when the basis spans the rows of an (m x n) matrix (m <= n), False when it spans the columns."""
    if len(shape) != 2:
        raise ValueError(f"low-rank projection needs a 2-D tensor, got shape {tuple(shape)}")
    return shape[0] <= shape[1]


def orient(matrix: torch.Tensor) -> torch.Tensor:
    """(m x n) -> (min(m, n) x max(m, n)) view: the basis side first."""
    return matrix if projects_rows(matrix.shape) else matrix.mT


def basis_rows(shape: torch.Size | tuple[int, ...]) -> int:
    """Length of the basis vectors for a weight of ``shape``: min(m, n)."""
    projects_rows(shape)  # validates 2-D
    return min(shape[0], shape[1])


def project_gradient(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Projects an (m x n) gradient onto the basis.

    Args:
        grad: (m, n) gradient.
        basis: (min(m, n), r) columns: orthonormal, or the "random" projector's Gaussian.

    Returns:
        (r, max(m, n)) projected gradient, in ``grad``'s dtype. The basis is cast to the gradient's dtype
        rather than the gradient to fp32, so the transient copy is (min(m, n) x r), not (m x n).
    """
    return basis.to(grad.dtype).mT @ orient(grad)


def project_back(low_rank: torch.Tensor, basis: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """Maps a low-rank update back to the weight's shape.

    Args:
        low_rank: (r, max(m, n)) update in the projected space.
        basis: (min(m, n), r) columns: orthonormal, or the "random" projector's Gaussian.
        weight_shape: (m, n) of the weight.

    Returns:
        (m, n) tensor (possibly a transposed view) in ``low_rank``'s dtype.
    """
    full = basis.to(low_rank.dtype) @ low_rank
    return full if projects_rows(weight_shape) else full.mT


def subspace_overlap(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """||P_old^T P_new||_F^2 / r: 1 when two bases span the same subspace, about r/d for random ones.

    Invariant to rotations and sign flips inside either basis, unlike comparing single vectors.

    Args:
        old: (d, r) orthonormal columns.
        new: (d, r) orthonormal columns.

    Returns:
        0-dim fp32 tensor in [0, 1].
    """
    overlap = old.float().mT @ new.float()
    return overlap.square().sum() / old.shape[1]
