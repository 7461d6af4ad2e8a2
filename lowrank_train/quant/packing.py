"""Packing of signed 4-bit codes two per byte.

A 4-bit code lives in [-8, 7]. It is stored as its two's-complement nibble (``code & 0xF``); element ``2k`` goes
to the low nibble and element ``2k + 1`` to the high nibble of byte ``k``. This halves the bytes of an INT4
tensor compared with one code per ``int8`` (Q-GaLore's published package stores one code per byte, issue 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_MIN = -8
INT4_MAX = 7


def pack_int4(codes: Tensor) -> Tensor:
    """Packs signed 4-bit codes two per byte.

    Args:
        codes: integer tensor of any shape with values in [-8, 7] and an even number of elements. It is read
            in flattened (row-major) order.

    Returns:
        ``uint8`` tensor of shape ``(codes.numel() // 2,)``.

    Raises:
        ValueError: if ``codes`` is not an integer tensor or has an odd number of elements.
    """
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"pack_int4 expects an integer tensor of codes in [-8, 7], got dtype {codes.dtype}")
    if codes.numel() % 2 != 0:
        raise ValueError(
            f"pack_int4 needs an even number of codes to fill whole bytes, got {codes.numel()}; "
            "pad the codes (e.g. with a zero code) before packing"
        )
    nibbles = codes.reshape(-1, 2).to(torch.int16) & 0xF
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`.

    Args:
        packed: ``uint8`` tensor of shape ``(k,)`` (any shape is read flattened).

    Returns:
        ``int8`` tensor of shape ``(2 * k,)`` with values in [-8, 7].

    Raises:
        ValueError: if ``packed`` is not ``uint8``.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects the uint8 output of pack_int4, got dtype {packed.dtype}")
    flat = packed.reshape(-1).to(torch.int16)
    nibbles = torch.stack((flat & 0xF, (flat >> 4) & 0xF), dim=1).reshape(-1)
    # Sign-extend the two's-complement nibble: 8..15 stand for -8..-1.
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
