"""Bit-packed masks: the one mask layout every backend reads and writes.

A mask for a tensor of ``n`` elements is a contiguous ``uint8`` tensor of ``ceil(n / 8)``
bytes; element ``j`` (flat, row-major) is bit ``j % 8`` (least significant first) of byte
``j // 8``. Padding bits of the last byte are zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_numel(n: int) -> int:
    """Bytes needed for a mask of ``n`` elements."""
    return (n + 7) // 8


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean tensor (any shape) into ``uint8[ceil(numel/8)]``."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    w = _WEIGHTS.to(flat.device)
    return (flat.view(-1, 8) * w).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int, shape: torch.Size | tuple[int, ...] | None = None) -> Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``numel`` elements (reshaped to ``shape``)."""
    w = _WEIGHTS.to(packed.device)
    bits = (packed.reshape(-1, 1) & w) != 0
    out = bits.reshape(-1)[:numel]
    return out.reshape(shape) if shape is not None else out


def count_bits(packed: Tensor) -> int:
    """Number of set bits in a packed mask (host sync)."""
    table = torch.tensor([i.bit_count() for i in range(256)], dtype=torch.int64, device=packed.device)
    return int(table[packed.long()].sum()) if packed.numel() else 0
