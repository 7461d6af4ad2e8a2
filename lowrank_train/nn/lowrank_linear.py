"""A linear layer stored as two low-rank factors ``W ~= A @ B`` (WeLore, Jaiswal et al., 2024, arXiv 2407.11239).

``A`` is ``out x k`` and ``B`` is ``k x in``. The factors come from
:func:`lowrank_train.welore.spectrum.truncated_factors` (the plain, ASVD-scaled or SVD-LLM-whitened truncated SVD,
``A = U_k sqrt(S_k)``, ``B = sqrt(S_k) V_k^T``); :meth:`LowRankLinear.from_factors` wraps them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LowRankLinear"]


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
    def from_factors(cls, linear: nn.Linear, factor_out: Tensor, factor_in: Tensor) -> LowRankLinear:
        """The layer ``A @ B`` replacing ``linear``: the factors are cast to its dtype and device, its bias is copied.

        Args:
            linear: the dense layer being replaced (left unchanged).
            factor_out: ``A``, shape ``(out_features, rank)``, e.g. from ``truncated_factors``.
            factor_in: ``B``, shape ``(rank, in_features)``.

        Raises:
            ValueError: factor shapes that do not fit ``linear`` or each other.
        """
        rank = factor_out.shape[-1]
        expected = ((linear.out_features, rank), (rank, linear.in_features))
        if (tuple(factor_out.shape), tuple(factor_in.shape)) != expected:
            raise ValueError(
                f"factors of shapes {tuple(factor_out.shape)} and {tuple(factor_in.shape)} do not fit a "
                f"({linear.out_features}, {linear.in_features}) layer: expected {expected[0]} and {expected[1]}"
            )
        weight = linear.weight
        # Built on the meta device: no random init is paid for factors that are replaced at once.
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, "meta", weight.dtype)
        layer.factor_out = nn.Parameter(factor_out.detach().to(weight.device, weight.dtype))
        layer.factor_in = nn.Parameter(factor_in.detach().to(weight.device, weight.dtype))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
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
