"""Stage two of the deterministic reductions (gram, merge_stats, row norms).

Stage one writes one fp64 partial per (block, output) into a buffer indexed by the block's
global rank (products in fp32, their block sum in fp64); stage two sums each output's partials
in a fixed order in fp64. No float atomics, so a result is identical run to run for the same
inputs and launch shape, and it stays close to the reference's fp64 sums under cancellation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import helper

STAGE2_BLOCK = 1024


@triton.jit
def _sum_partials_kernel(part, out, n_blocks, n_out, BLOCK: tl.constexpr):
    """out[p] = sum_b part[b, p] (fp64), blocks in increasing order, rounded once to fp32."""
    p = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for b0 in range(0, n_blocks, BLOCK):
        b = b0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(part + b * n_out + p, mask=b < n_blocks, other=0.0)
    tl.store(out + p, tl.sum(acc, axis=0).to(tl.float32))


def sum_partials(part: Tensor, n_blocks: int, n_out: int) -> Tensor:
    """Second stage: ``part`` is fp64 ``[>= n_blocks, n_out]``; returns fp32 ``[n_out]``."""
    out = mt.alloc(n_out, torch.float32, part.device)
    if n_blocks == 0:
        return out.zero_()
    _sum_partials_kernel[(n_out,)](part, out, n_blocks, n_out, BLOCK=STAGE2_BLOCK)
    return out


@helper
def dsum(x):
    return tl.sum(x.to(tl.float64), axis=0)
