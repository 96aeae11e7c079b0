"""MEHL-Soup: ``soup_combine_`` and ``soup_coef_grads`` (deterministic) as multi-tensor launches.

The K ingredient differences are operand rows ``2..K+1`` (combine) / ``1..K`` (coefficient
gradients) of one table; K is a constexpr, so the loop over the ingredients is unrolled.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import BLOCK, block_info, groups, launch, on_device, operand_ptr, tl_dtype
from fastclu.ops.triton._reduce import dsum as _dsum

SEGMENT_BLOCK = 1024


@triton.jit
def _soup_combine_kernel(
    ptrs, numel, blk_tensor, blk_start, index, n_tensors, coefs, n_cols, col_stride,
    blk0, K: tl.constexpr, DO: tl.constexpr, DB: tl.constexpr, DD: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(blk_tensor, blk_start, numel, tl.program_id(0) + blk0, BLOCK, EVEN)
    col = tl.load(index + t) * col_stride
    acc = tl.load(operand_ptr(ptrs, n_tensors, 1, t, DB, ALIGN) + offs, mask=m).to(tl.float32)
    for k in tl.static_range(K):
        c = tl.load(coefs + k * n_cols + col)
        d = tl.load(operand_ptr(ptrs, n_tensors, 2 + k, t, DD, ALIGN) + offs, mask=m).to(tl.float32)
        acc += c * d
    tl.store(operand_ptr(ptrs, n_tensors, 0, t, DO, ALIGN) + offs, acc.to(DO), mask=m)


@register("soup_combine_", "triton")
@on_device
def soup_combine_(out: list[Tensor], base: list[Tensor], diffs: list[list[Tensor]], coefs: Tensor) -> None:
    """``out = base + sum_k coefs[k, l] * diffs[k]``; see :func:`fastclu.ops.soup_combine_`."""
    if not out:
        return
    K, n_cols = len(diffs), coefs.shape[1]
    gs, _ = groups([out, base, *diffs])
    for g in gs:
        if g.n_blocks == 0:
            continue
        launch(_soup_combine_kernel, g,
            g.ptrs, g.numel, g.blk_tensor, g.blk_start, g.index, g.n_tensors, coefs, n_cols, int(n_cols > 1),
            K=K, DO=tl_dtype(g.dtypes[0]), DB=tl_dtype(g.dtypes[1]), DD=tl_dtype(g.dtypes[2]), BLOCK=BLOCK,
        )  # fmt: skip


@triton.jit
def _soup_partials_kernel(
    ptrs, numel, blk_tensor, blk_start, blk_global, n_tensors, part,
    blk0, K: tl.constexpr, DG: tl.constexpr, DD: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    t, offs, m = block_info(blk_tensor, blk_start, numel, pid, BLOCK, EVEN)
    gb = tl.load(blk_global + pid)
    g = tl.load(operand_ptr(ptrs, n_tensors, 0, t, DG, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        d = tl.load(operand_ptr(ptrs, n_tensors, 1 + k, t, DD, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(part + gb * K + k, _dsum(g * d))


@triton.jit
def _soup_segments_kernel(
    part, seg_first, seg_count, seg_out, n_tensors, max_count, K: tl.constexpr, BLOCK: tl.constexpr
):
    """seg_out[k, i] = sum of tensor i's block partials (fp64, blocks in increasing order)."""
    i = tl.program_id(0)
    k = tl.program_id(1)
    f = tl.load(seg_first + i)
    n = tl.load(seg_count + i)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    # bounded by the host's largest count (not the loaded one): the interpreter needs a host bound
    for b0 in range(0, max_count, BLOCK):
        b = b0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(part + (f + b) * K + k, mask=b < n, other=0.0)
    tl.store(seg_out + k * n_tensors + i, tl.sum(acc, axis=0))


@functools.lru_cache(maxsize=64)
def _segments(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Per tensor of the list: the global rank of its first block and its block count (list order)."""
    counts = [triton.cdiv(n, BLOCK) for n in numels]
    firsts = [0] * len(counts)
    for i in range(1, len(counts)):
        firsts[i] = firsts[i - 1] + counts[i - 1]
    both = torch.tensor([firsts, counts], dtype=torch.int64).to(device)
    return both[0], both[1], max(counts, default=0)


@register("soup_coef_grads", "triton")
@on_device
def soup_coef_grads(grads: list[Tensor], diffs: list[list[Tensor]], *, layerwise: bool) -> Tensor:
    """fp32 ``[K, L]`` (or ``[K, 1]``) inner products; see :func:`fastclu.ops.soup_coef_grads`."""
    K, L = len(diffs), len(grads)
    dev = grads[0].device if grads else torch.device("cpu")
    if L == 0:
        return torch.zeros(K, L if layerwise else 1, dtype=torch.float32, device=dev)
    gs, total = groups([grads, *diffs])
    part = mt.alloc((max(total, 1), K), torch.float64, dev)
    for g in gs:
        if g.n_blocks == 0:
            continue
        launch(_soup_partials_kernel, g,
            g.ptrs, g.numel, g.blk_tensor, g.blk_start, g.blk_global, g.n_tensors, part,
            K=K, DG=tl_dtype(g.dtypes[0]), DD=tl_dtype(g.dtypes[1]), BLOCK=BLOCK,
        )  # fmt: skip
    first, count, max_count = _segments(tuple(t.numel() for t in grads), dev)
    per = mt.alloc((K, L), torch.float64, dev)
    _soup_segments_kernel[(L, K)](part, first, count, per, L, max_count, K=K, BLOCK=SEGMENT_BLOCK)
    # the layer sum is torch's fixed-order fp64 reduction of [K, L]: deterministic as well
    return (per if layerwise else per.sum(1, keepdim=True)).to(torch.float32)
