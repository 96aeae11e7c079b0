"""Deterministic reductions: gram, merge_stats and per-row norms.

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

from fastclu._registry import register
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import BLOCK, block_info, groups, helper, launch, on_device, operand_ptr, tl_dtype

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
def _dsum(x):
    return tl.sum(x.to(tl.float64), axis=0)


@helper
def _store2(base, R: tl.constexpr, r: tl.constexpr, c: tl.constexpr, v):
    tl.store(base + r * R + c, v)
    tl.store(base + c * R + r, v)


@helper
def _mask_bits(mptr, offs, m):
    byte = tl.load(mptr + (offs >> 3), mask=m, other=0).to(tl.int32)
    return ((byte >> (offs & 7).to(tl.int32)) & 1) != 0


@triton.jit
def _gram_kernel(
    ptrs, numel, blk_tensor, blk_start, blk_global, n_tensors, part,
    blk0, R: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
    HAS_MASK: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    t, offs, m = block_info(blk_tensor, blk_start, numel, pid, BLOCK, EVEN)
    gb = tl.load(blk_global + pid)
    if HAS_MASK:
        bits = _mask_bits(operand_ptr(ptrs, n_tensors, R, t, tl.uint8, ALIGN), offs, m)
    else:
        bits = tl.full([BLOCK], 1, tl.int1)
    g0 = tl.load(operand_ptr(ptrs, n_tensors, 0, t, D0, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    if M0:
        g0 = tl.where(bits, g0, 0.0)  # selection: inf/NaN under a 0 bit drop out
    g1 = g0
    g2 = g0
    g3 = g0
    if R > 1:
        g1 = tl.load(operand_ptr(ptrs, n_tensors, 1, t, D1, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        if M1:
            g1 = tl.where(bits, g1, 0.0)  # selection: inf/NaN under a 0 bit drop out
    if R > 2:
        g2 = tl.load(operand_ptr(ptrs, n_tensors, 2, t, D2, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        if M2:
            g2 = tl.where(bits, g2, 0.0)  # selection: inf/NaN under a 0 bit drop out
    if R > 3:
        g3 = tl.load(operand_ptr(ptrs, n_tensors, 3, t, D3, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        if M3:
            g3 = tl.where(bits, g3, 0.0)  # selection: inf/NaN under a 0 bit drop out
    # every one of the R * R partials is written (the mirror too): stage two sums them all, and an
    # unwritten slot would feed it uninitialised memory
    base = part + gb * (R * R)
    tl.store(base + 0, _dsum(g0 * g0))
    if R > 1:
        _store2(base, R, 0, 1, _dsum(g0 * g1))
        tl.store(base + R + 1, _dsum(g1 * g1))
    if R > 2:
        _store2(base, R, 0, 2, _dsum(g0 * g2))
        _store2(base, R, 1, 2, _dsum(g1 * g2))
        tl.store(base + 2 * R + 2, _dsum(g2 * g2))
    if R > 3:
        _store2(base, R, 0, 3, _dsum(g0 * g3))
        _store2(base, R, 1, 3, _dsum(g1 * g3))
        _store2(base, R, 2, 3, _dsum(g2 * g3))
        tl.store(base + 3 * R + 3, _dsum(g3 * g3))


@register("gram", "triton")
@on_device
def gram(grads: list[list[Tensor]], *, mask: list[Tensor] | None, masked: list[bool]) -> Tensor:
    """fp32 ``[R, R]`` Gram matrix of the masked role gradients; see :func:`fastclu.ops.gram`."""
    R = len(grads)
    dev = grads[0][0].device if grads[0] else torch.device("cpu")
    if not grads[0]:
        return torch.zeros(R, R, dtype=torch.float32, device=dev)
    flags = [bool(f) and mask is not None for f in masked] + [False] * (4 - R)
    gs, total = groups([*grads, mask])
    part = mt.alloc((max(total, 1), R * R), torch.float64, dev)
    for g in gs:
        if g.n_blocks == 0:
            continue
        dts = [tl_dtype(d) for d in g.dtypes[:R]] + [tl.float32] * (4 - R)
        launch(_gram_kernel, g, 
            g.ptrs, g.numel, g.blk_tensor, g.blk_start, g.blk_global, g.n_tensors, part,
            R=R, M0=flags[0], M1=flags[1], M2=flags[2], M3=flags[3], HAS_MASK=mask is not None,
            D0=dts[0], D1=dts[1], D2=dts[2], D3=dts[3], BLOCK=BLOCK,
        )  # fmt: skip
    g = sum_partials(part, total, R * R).view(R, R)
    # Both triangles were summed from identical partials in the same order: exactly symmetric already;
    # the mirror keeps that a property of this function rather than of the kernel.
    return torch.triu(g) + torch.triu(g, diagonal=1).T


@triton.jit
def _merge_stats_kernel(
    ptrs, numel, blk_tensor, blk_start, blk_global, n_tensors, part,
    blk0, DP: tl.constexpr, DA: tl.constexpr, DF: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    t, offs, m = block_info(blk_tensor, blk_start, numel, pid, BLOCK, EVEN)
    gb = tl.load(blk_global + pid)
    p = tl.load(operand_ptr(ptrs, n_tensors, 0, t, DP, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(operand_ptr(ptrs, n_tensors, 1, t, DA, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    fs = tl.load(operand_ptr(ptrs, n_tensors, 2, t, DF, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    ft = tl.load(operand_ptr(ptrs, n_tensors, 3, t, DT, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    d = p - a
    tl.store(part + gb * 2, _dsum(d * (ft - a * fs)))
    tl.store(part + gb * 2 + 1, _dsum(d * d * fs))


@register("merge_stats", "triton")
@on_device
def merge_stats(
    params: list[Tensor], anchor: list[Tensor], fisher_sum: list[Tensor], fisher_theta_sum: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """(num, den) fp32 0-d tensors; see :func:`fastclu.ops.merge_stats`."""
    dev = params[0].device if params else torch.device("cpu")
    if not params:
        z = torch.zeros(2, dtype=torch.float32, device=dev)
        return z[0], z[1]
    gs, total = groups([params, anchor, fisher_sum, fisher_theta_sum])
    part = mt.alloc((max(total, 1), 2), torch.float64, dev)
    for g in gs:
        if g.n_blocks == 0:
            continue
        d = [tl_dtype(x) for x in g.dtypes]
        launch(_merge_stats_kernel, g, 
            g.ptrs, g.numel, g.blk_tensor, g.blk_start, g.blk_global, g.n_tensors, part,
            DP=d[0], DA=d[1], DF=d[2], DT=d[3], BLOCK=BLOCK,
        )  # fmt: skip
    out = sum_partials(part, total, 2)
    return out[0], out[1]


@triton.jit
def _row_norm_kernel(ptrs, numel, rowlen, blk_tensor, blk_start, n_tensors, DP: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row, columns in a fixed-order loop: deterministic, no second stage.
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)
    ln = tl.load(rowlen + t)
    p = operand_ptr(ptrs, n_tensors, 0, t, DP)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for c in range(0, ln, BLOCK):
        cols = c + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(p + start + cols, mask=cols < ln, other=0.0).to(tl.float64)
        acc += x * x
    out = operand_ptr(ptrs, n_tensors, 1, t, tl.float32)
    # fp64 sum of squares rounded once, as the reference's fp64 norm
    tl.store(out + start // ln, tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32))


def row_norms(params: list[Tensor]) -> list[Tensor]:
    """fp32 L2 norm of each row (dim 0; ndim <= 1 is one row) of each tensor: ``[rows]`` each."""
    outs = [mt.alloc(p.shape[0] if p.dim() >= 2 else 1, torch.float32, p.device) for p in params]
    for o, p in zip(outs, params):
        if p.numel() == 0:
            o.zero_()  # rows of length 0 (or a lone empty row) have norm 0
    if not params:
        return outs
    gs, _ = groups([params, outs], chunk=2**62, rows=True)
    for g in gs:
        if g.n_blocks == 0:
            continue
        _row_norm_kernel[(g.n_blocks,)](
            g.ptrs, g.numel, g.rowlen, g.blk_tensor, g.blk_start, g.n_tensors,
            DP=tl_dtype(g.dtypes[0]), BLOCK=BLOCK,
        )  # fmt: skip
    return outs
