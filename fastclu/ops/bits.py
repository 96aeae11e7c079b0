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


def unpack_bits_list(
    packed: list[Tensor], shapes: list[torch.Size] | list[tuple[int, ...]], dtype: torch.dtype = torch.bool
) -> list[Tensor]:
    """:func:`unpack_bits` of every mask at once: one concatenation, one unpack, then views.

    ``packed[i]`` (``uint8[ceil(numel_i / 8)]``, all on one device) becomes a tensor of shape
    ``shapes[i]``: bool, or for an integer ``dtype`` words with every bit set where the mask is 1
    (``-1``) and 0 elsewhere. The results are views into one flat buffer (do not resize them). A
    constant number of ATen ops however many tensors there are, instead of five per tensor.
    """
    if len(packed) != len(shapes):
        raise ValueError(f"packed has {len(packed)} masks but shapes has {len(shapes)} entries")
    if not packed:
        return []
    flat = torch.cat([m.reshape(-1) for m in packed]) if len(packed) > 1 else packed[0].reshape(-1)
    bits = ((flat.reshape(-1, 1) & _WEIGHTS.to(flat.device)) != 0).reshape(-1)
    if dtype != torch.bool:
        bits = bits.to(dtype).neg_()
    chunks = bits.split([8 * m.numel() for m in packed])
    out = []
    for chunk, shape in zip(chunks, shapes):
        n = 1
        for d in shape:
            n *= d
        out.append(chunk[:n].view(shape))
    return out


def count_bits(packed: Tensor) -> int:
    """Number of set bits in a packed mask (host sync)."""
    table = torch.tensor([i.bit_count() for i in range(256)], dtype=torch.int64, device=packed.device)
    return int(table[packed.long()].sum()) if packed.numel() else 0
