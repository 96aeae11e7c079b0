"""Counter-based Philox 4x32-10, written once with int64 tensor arithmetic.

This is the noise contract every backend implements bit for bit: for a key ``seed`` (64-bit)
and a counter ``(c0, c1, c2, c3) = (j & 0xffffffff, j >> 32, tensor_index, 0)`` where ``j``
is the flat element index, the rounds and constants are those of Triton's ``tl.philox``
(and Salmon et al. 2011). The first two outputs become a normal the way ``tl.randn`` does:
int32 -> uniform in [0, 1) with scale 4.6566127342e-10, then Box-Muller's cosine branch.
All 32-bit words are held in int64 tensors in [0, 2**32) so no op overflows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
N_ROUNDS = 10
_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
UNIFORM_SCALE = 4.6566127342e-10  # largest s with (2**31 - 1) * s < 1 in fp32


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and words ``b``."""
    b_lo, b_hi = b & _M16, b >> 16
    p_lo, p_hi = b_lo * a, b_hi * a  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & _M16) << 16)) & _M32
    return hi, lo


def philox4x32(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox 4x32-10 on int64 tensors holding 32-bit words; returns the four output words."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul32(ROUND_B, c2)
        hi_a, lo_a = _mul32(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _M32, (k1 + KEY_B) & _M32
    return c0, c1, c2, c3


def uint_to_uniform(x: Tensor) -> Tensor:
    """32-bit words -> fp32 uniforms in [0, 1), as ``tl.uint_to_uniform_float`` does."""
    signed = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def philox_words(
    seed: int, tensor_index: int, start: int, count: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw Philox words for elements ``start .. start+count-1`` of tensor ``tensor_index``."""
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    c0, c1 = j & _M32, j >> 32
    c2 = torch.full_like(j, tensor_index & _M32)
    return philox4x32(seed, c0, c1, c2, torch.zeros_like(j))


def philox_normal(
    seed: int, tensor_index: int, numel: int, device: torch.device | str = "cpu", start: int = 0
) -> Tensor:
    """fp32 standard normals for elements ``start .. start+numel-1`` of tensor ``tensor_index``."""
    w0, w1, _, _ = philox_words(seed, tensor_index, start, numel, device)
    u1 = torch.clamp(uint_to_uniform(w0), min=1.0e-7)
    u2 = uint_to_uniform(w1)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(torch.tensor(2 * math.pi, dtype=torch.float32) * u2)
