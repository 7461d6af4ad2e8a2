"""Group-wise symmetric quantization to 8 and 4 bits.

The tensor is flattened in row-major order and cut into groups of ``group_size`` consecutive elements; each
group gets one fp32 scale ``absmax / qmax`` (``qmax`` = 127 for 8 bits, 7 for 4 bits) and its elements become
integer codes ``round(x / scale)`` in ``[-qmax, qmax]``. When ``group_size`` divides a row, the groups are
row chunks, so "along rows" grouping is the special case of a row length that ``group_size`` divides.

Why symmetric (no zero point): the tensors quantized here are projection bases (orthonormal columns, entries
centred on zero) and linear weights (zero-mean at init and through training), so a zero point buys almost
nothing while costing a second per-group tensor and an add in every dequantize. Symmetric codes also keep 0.0
exact, make zero padding harmless (a padded zero never changes a group's absmax), and keep stochastic rounding
unbiased without clamping (``|x / scale| <= qmax`` always holds). The price is one unused code (-128 or -8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lowrank_train.quant.packing import pack_int4, unpack_int4
from lowrank_train.quant.rounding import stochastic_round

SUPPORTED_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 256


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_group_size(group_size: int, numel: int, shape: tuple[int, ...], pad: bool) -> int:
    """Returns the number of groups; refuses implicit padding."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if numel == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(shape)}")
    if numel % group_size != 0 and not pad:
        raise ValueError(
            f"group_size={group_size} does not divide the {numel} elements of a tensor of shape {tuple(shape)}; "
            "quantize refuses to pad implicitly: pass pad=True to zero-pad the last group (the padding is "
            f"dropped on dequantize), or choose a group size that divides {numel}"
        )
    return -(-numel // group_size)


def quantize(
    x: Tensor,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    pad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quantizes a tensor group-wise and symmetrically.

    Args:
        x: floating tensor of any shape with ``numel`` elements.
        bits: 8 or 4.
        group_size: number of consecutive (flattened, row-major) elements sharing one scale.
        stochastic: round up with probability equal to the fractional part instead of to nearest.
        generator: source of randomness for ``stochastic``; must be on ``x``'s device type.
        pad: zero-pad the last group when ``group_size`` does not divide ``numel``; without it such a size is a
            ``ValueError``.

    Returns:
        ``codes``: ``int8`` tensor of shape ``(num_groups, group_size)`` with values in ``[-qmax, qmax]``
        (unpacked; see :class:`QuantizedTensor` for packed 4-bit storage).
        ``scales``: ``float32`` tensor of shape ``(num_groups,)``.

    Raises:
        ValueError: bad ``bits``, ``group_size``, dtype, or a group size that does not divide without ``pad``.
    """
    qmax = _check_bits(bits)
    if not x.is_floating_point():
        raise ValueError(f"quantize expects a floating tensor, got dtype {x.dtype}")
    num_groups = _check_group_size(group_size, x.numel(), tuple(x.shape), pad)
    flat = x.detach().reshape(-1).to(torch.float32)
    padding = num_groups * group_size - flat.numel()
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    groups = flat.reshape(num_groups, group_size)
    absmax = groups.abs().amax(dim=1)
    # An all-zero group gets scale 1 so that 0 / scale stays 0 instead of NaN.
    scales = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / qmax
    scaled = groups / scales[:, None]
    rounded = stochastic_round(scaled, generator) if stochastic else torch.round(scaled)
    # The clamp only guards against fp round-off at |scaled| == qmax; it never binds otherwise.
    codes = rounded.clamp_(-qmax, qmax).to(torch.int8)
    return codes, scales


def dequantize(
    codes: Tensor, scales: Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize` (up to rounding).

    Args:
        codes: integer codes of shape ``(num_groups, group_size)`` (any shape with that many elements).
        scales: ``(num_groups,)`` scales.
        shape: shape of the original tensor; trailing padding beyond its ``numel`` is dropped.
        dtype: dtype of the result.

    Returns:
        Tensor of ``shape`` and ``dtype``.
    """
    num_groups = scales.numel()
    values = codes.reshape(num_groups, -1).to(torch.float32) * scales.reshape(-1, 1).to(torch.float32)
    numel = 1
    for size in shape:
        numel *= size
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)


class QuantizedTensor(NamedTuple):
    """A quantized tensor made only of tensors and ints, so it can be kept as separate optimizer-state keys.

    Attributes:
        codes: ``int8`` codes of shape ``(num_groups * group_size,)`` for 8 bits; for 4 bits the codes packed
            two per byte, ``uint8`` of shape ``(num_groups * group_size // 2,)``.
        scales: ``float32`` per-group scales, shape ``(num_groups,)``.
        shape: shape of the original tensor.
        bits: 8 or 4.
        group_size: elements per group.
    """

    codes: Tensor
    scales: Tensor
    shape: tuple[int, ...]
    bits: int
    group_size: int

    @classmethod
    def from_float(
        cls,
        x: Tensor,
        bits: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
        pad: bool = True,
    ) -> QuantizedTensor:
        """Quantizes ``x`` (see :func:`quantize`), packing 4-bit codes two per byte.

        Padding is on by default here because the padded tail is part of the stored codes and is dropped by
        :meth:`dequantize`. 4-bit packing needs an even ``num_groups * group_size``.
        """
        if bits == 4 and group_size % 2 != 0:
            raise ValueError(f"4-bit codes are packed two per byte, so group_size must be even, got {group_size}")
        codes, scales = quantize(x, bits, group_size, stochastic=stochastic, generator=generator, pad=pad)
        stored = pack_int4(codes) if bits == 4 else codes.reshape(-1)
        return cls(stored, scales, tuple(x.shape), bits, group_size)

    def unpacked_codes(self) -> Tensor:
        """Returns the ``int8`` codes, shape ``(num_groups, group_size)``."""
        codes = unpack_int4(self.codes) if self.bits == 4 else self.codes
        return codes.reshape(self.scales.numel(), self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Returns the float tensor of ``self.shape`` and ``dtype``."""
        return dequantize(self.unpacked_codes(), self.scales, self.shape, dtype)

    def nbytes(self) -> int:
        """Bytes held by codes and scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def to_state(self, prefix: str) -> dict[str, Tensor]:
        """Flattens into tensor-only entries ``{prefix}_codes``, ``{prefix}_scales``, ``{prefix}_qshape``,
        ``{prefix}_qmeta`` (``[bits, group_size]``), for ``optimizer.state`` and ``torch.load(weights_only=True)``.

        Note: ``{prefix}_scales`` is floating point; an optimizer must exempt it from the dtype cast that
        ``torch.optim.Optimizer.load_state_dict`` applies to floating state.
        """
        device = self.codes.device
        return {
            f"{prefix}_codes": self.codes,
            f"{prefix}_scales": self.scales,
            f"{prefix}_qshape": torch.tensor(self.shape, dtype=torch.int64, device=device),
            f"{prefix}_qmeta": torch.tensor([self.bits, self.group_size], dtype=torch.int64, device=device),
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> QuantizedTensor:
        """Inverse of :meth:`to_state`."""
        bits, group_size = (int(v) for v in state[f"{prefix}_qmeta"].tolist())
        shape = tuple(int(v) for v in state[f"{prefix}_qshape"].tolist())
        return cls(state[f"{prefix}_codes"], state[f"{prefix}_scales"], shape, bits, group_size)
