"""A linear layer stored as two low-rank factors, and the (activation-weighted) SVD that builds it.

``W ~= A @ B`` with ``A = U_k sqrt(S_k)`` (``out x k``) and ``B = sqrt(S_k) V_k^T`` (``k x in``), as in WeLore
(Jaiswal et al., 2024, arXiv 2407.11239). Splitting ``sqrt(S_k)`` evenly keeps both factors on the same scale,
which matters once they are fine-tuned.

The truncation can be weighted by the layer's inputs so that directions that real activations use are kept:

* ``input_scale`` (ASVD, Yuan et al., 2023): per-input-channel scales ``s`` (``in``); the SVD is taken of
  ``W diag(s)`` and ``diag(s)^-1`` is folded back into ``B``.
* ``whitening`` (SVD-LLM, Wang et al., 2024): a lower-triangular ``L`` (``in x in``) with ``L L^T = E[x x^T]``;
  truncating the SVD of ``W L`` minimises ``||(W - A B) X||_F`` over rank-``k`` products, and ``L^-1`` is folded
  back into ``B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LowRankLinear", "lowrank_factors", "weighted_matrix"]


def _check_weighting(weight: Tensor, input_scale: Tensor | None, whitening: Tensor | None) -> None:
    in_features = weight.shape[1]
    if input_scale is not None and whitening is not None:
        raise ValueError("pass at most one of input_scale (ASVD) and whitening (SVD-LLM), not both")
    if input_scale is not None:
        if input_scale.shape != (in_features,):
            raise ValueError(f"input_scale must have shape ({in_features},), got {tuple(input_scale.shape)}")
        if not bool(torch.all(input_scale > 0)):
            raise ValueError("input_scale must be strictly positive (it is inverted when folded back)")
    if whitening is not None and whitening.shape != (in_features, in_features):
        raise ValueError(
            f"whitening must be a lower-triangular ({in_features}, {in_features}) factor, got {tuple(whitening.shape)}"
        )


def weighted_matrix(weight: Tensor, input_scale: Tensor | None = None, whitening: Tensor | None = None) -> Tensor:
    """The matrix whose SVD is truncated: ``W``, ``W diag(s)`` or ``W L``, in float32 (float64 stays float64).

    Args:
        weight: ``(out, in)`` weight of a linear layer, any float dtype.
        input_scale: optional ``(in,)`` positive per-channel scales (ASVD).
        whitening: optional ``(in, in)`` lower-triangular factor of the input second moment (SVD-LLM).

    Returns:
        ``(out, in)`` matrix in float32 or float64.
    """
    _check_weighting(weight, input_scale, whitening)
    # bf16/fp16 SVDs are inaccurate (and unsupported on CPU): always work in at least float32.
    matrix = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    if input_scale is not None:
        return matrix * input_scale.to(matrix.device, matrix.dtype)
    if whitening is not None:
        return matrix @ whitening.to(matrix.device, matrix.dtype)
    return matrix


def lowrank_factors(
    weight: Tensor,
    rank: int,
    input_scale: Tensor | None = None,
    whitening: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-``k`` factors ``A, B`` with ``A @ B ~= W``, from an (optionally activation-weighted) SVD in float32.

    Args:
        weight: ``(out, in)`` weight.
        rank: number of singular directions kept, ``1 <= rank <= min(out, in)``.
        input_scale: optional ``(in,)`` ASVD channel scales.
        whitening: optional ``(in, in)`` lower-triangular whitening factor ``L`` (``L L^T = E[x x^T]``).

    Returns:
        ``A`` of shape ``(out, rank)`` and ``B`` of shape ``(rank, in)``, float32 (float64 for float64 weights).
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}] for a {tuple(weight.shape)} weight")
    matrix = weighted_matrix(weight, input_scale, whitening)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    factor_out = u[:, :rank] * root
    factor_in = root[:, None] * vh[:rank]
    # Undo the weighting on the input side only, so A B approximates W itself.
    if input_scale is not None:
        factor_in = factor_in / input_scale.to(factor_in.device, factor_in.dtype)
    elif whitening is not None:
        # B = C L^-1  <=>  L^T B^T = C^T, a triangular solve (no explicit inverse).
        lower = whitening.to(factor_in.device, factor_in.dtype)
        factor_in = torch.linalg.solve_triangular(lower.T, factor_in.T, upper=True).T
    return factor_out, factor_in


class LowRankLinear(nn.Module):
    """``y = x B^T A^T + bias``: a linear layer whose ``(out, in)`` weight is stored as ``A @ B``.

    Args:
        in_features: input size ``n``.
        out_features: output size ``m``.
        rank: inner size ``k``; the layer holds ``k (m + n)`` weights instead of ``m n``.
        bias: whether to add a learnable ``(m,)`` bias.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Attributes:
        factor_out: ``A``, shape ``(out_features, rank)``.
        factor_in: ``B``, shape ``(rank, in_features)``.
        bias: ``(out_features,)`` or ``None``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.factor_out = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.factor_in = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init with the variance of ``nn.Linear``'s product (used only before a checkpoint is loaded)."""
        nn.init.kaiming_uniform_(self.factor_in, a=math.sqrt(5))
        nn.init.normal_(self.factor_out, std=1.0 / math.sqrt(self.rank))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        input_scale: Tensor | None = None,
        whitening: Tensor | None = None,
    ) -> LowRankLinear:
        """Factorize a dense layer by truncated SVD; dtype, device and bias are kept.

        Args:
            linear: the layer to replace (left unchanged).
            rank: number of singular directions kept.
            input_scale: optional ``(in,)`` ASVD channel scales.
            whitening: optional ``(in, in)`` lower-triangular SVD-LLM whitening factor.

        Returns:
            A new ``LowRankLinear`` on ``linear.weight``'s device and dtype.
        """
        weight = linear.weight
        factor_out, factor_in = lowrank_factors(weight, rank, input_scale, whitening)
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.factor_out.copy_(factor_out)
            layer.factor_in.copy_(factor_in)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: ``(..., in_features)``.

        Returns:
            ``(..., out_features)``.
        """
        return F.linear(F.linear(x, self.factor_in), self.factor_out, self.bias)

    def merged_weight(self) -> Tensor:
        """``A @ B`` computed in (at least) float32 and cast back, shape ``(out_features, in_features)``."""
        work = torch.promote_types(self.factor_out.dtype, torch.float32)
        product = self.factor_out.detach().to(work) @ self.factor_in.detach().to(work)
        return product.to(self.factor_out.dtype)

    def merge(self) -> nn.Linear:
        """A dense ``nn.Linear`` with weight ``A @ B`` (same bias, dtype and device); this layer is unchanged."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.factor_out.device,
            dtype=self.factor_out.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )
