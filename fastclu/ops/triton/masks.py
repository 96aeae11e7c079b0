"""Saliency mask kernels: the ratio mask and the exact global top-k mask.

Masks are written bit-packed (``fastclu.ops.bits``): every block starts at a multiple of 8
elements, so a block owns whole bytes and no two programs write the same byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.tables import TABLES
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import (
    BLOCK,
    C_NUMEL,
    block_info,
    block_info_ranked,
    block_rank,
    block_start,
    groups,
    helper,
    launch,
    load_scalar,
    on_device,
    operand_ptr,
    row_field,
    scalar_arg,
    table_args,
    tl_dtype,
)

# ---------------------------------------------------------------------------------------------
# bit packing helpers


@helper
def load_bits(mptr, tab, t, start, BLOCK: tl.constexpr, EVEN: tl.constexpr, LAYOUT: tl.constexpr):
    """[BLOCK] bools of row ``t``'s packed mask for the block of elements from ``start``.

    One byte load per 8 elements (a per-element ``offs >> 3`` load fetches every byte 8 times):
    blocks start at multiples of 8, so the bytes are ``start / 8 + [0, BLOCK / 8)`` and row i of
    the [BLOCK // 8, 8] bit view is byte i's elements. Bits past the tensor's end are 0.
    """
    byte_idx = (start >> 3) + tl.arange(0, BLOCK // 8).to(tl.int64)
    if EVEN:
        byte = tl.load(mptr + byte_idx).to(tl.int32)
    else:
        live = byte_idx * 8 < row_field(tab, t, C_NUMEL, LAYOUT)
        byte = tl.load(mptr + byte_idx, mask=live, other=0).to(tl.int32)
    bits = (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1
    return tl.reshape(bits, [BLOCK]) != 0


@helper
def _byte_offsets(start, BLOCK: tl.constexpr):
    """[BLOCK // 8, 8] element offsets and [BLOCK // 8] byte offsets of a block."""
    bytes_ = (start >> 3) + tl.arange(0, BLOCK // 8).to(tl.int64)
    offs = bytes_[:, None] * 8 + tl.arange(0, 8).to(tl.int64)[None, :]
    return bytes_, offs


@helper
def _pack(bits, BLOCK: tl.constexpr):
    """bool/int [BLOCK // 8, 8] -> uint8 [BLOCK // 8], bit j of byte = column j."""
    w = (1 << tl.arange(0, 8)).to(tl.int32)
    return tl.sum(bits.to(tl.int32) * w[None, :], axis=1).to(tl.uint8)


# ---------------------------------------------------------------------------------------------
# ratio_mask


@triton.jit
def _ratio_kernel(
    tab, dyn, n_rows, g_ptr, g_val, eps,
    blk0, G_T: tl.constexpr, DF: tl.constexpr, DR: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    # Compared in fp32, as the reference does for fp32/fp16/bf16 (fp64 never reaches a kernel).
    pid = tl.program_id(0) + blk0
    t, start = block_start(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    n = row_field(tab, t, C_NUMEL, LAYOUT)
    bytes_, offs = _byte_offsets(start, BLOCK)
    m = tl.full([BLOCK // 8, 8], 1, tl.int1) if EVEN else offs < n
    gamma = load_scalar(g_ptr, g_val, G_T)
    ff = tl.load(operand_ptr(tab, dyn, LAYOUT, 0, t, DF, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    fr = tl.load(operand_ptr(tab, dyn, LAYOUT, 1, t, DR, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    keep = ((ff + eps) >= gamma * (fr + eps)) & m
    out = operand_ptr(tab, dyn, LAYOUT, 2, t, tl.uint8, ALIGN)
    tl.store(out + bytes_, _pack(keep, BLOCK), mask=bytes_ * 8 < n)


def _empty_masks(xs: list[Tensor]) -> list[Tensor]:
    return [mt.alloc((x.numel() + 7) // 8, torch.uint8, x.device) for x in xs]


@register("ratio_mask", "triton")
@on_device
def ratio_mask(f_forget: list[Tensor], f_remain: list[Tensor], gamma: float | Tensor, *, eps: float) -> list[Tensor]:
    """Bit-packed ``(F_f + eps) >= gamma * (F_r + eps)``; see :func:`fastclu.ops.ratio_mask`."""
    outs = _empty_masks(f_forget)
    if not f_forget:
        return outs
    gs, _ = groups([f_forget, f_remain, outs], dynamic=TABLES["ratio_mask"].dynamic)
    for g in gs:
        if g.n_blocks == 0:
            continue
        gp, gv, gt = scalar_arg(gamma, f_forget[0].device, g.tab)
        launch(_ratio_kernel, g,
            *table_args(g), gp, gv, float(eps),
            G_T=gt, DF=tl_dtype(g.dtypes[0]), DR=tl_dtype(g.dtypes[1]), BLOCK=BLOCK,
        )  # fmt: skip
    return outs


# ---------------------------------------------------------------------------------------------
# topk_mask: exact global top-k by histogram radix select over ordered integer keys
#
# Each score becomes a uint32 key (fp64 scores never reach a kernel: fastclu.ops routes them to
# the reference, whose keys are 64-bit) whose unsigned order is the float order (-0.0 folded onto +0.0). Passes of 8 bits, most
# significant first, narrow the k-th largest key down: a pass histograms the digit of every
# key that matches the prefix found so far (integer atomics: exact and order independent),
# then one program picks the digit holding the k-th key and updates (prefix, k remaining) on
# the device, so there is no host sync. The result
# is the threshold key T and the number q of elements equal to T to keep; the earliest q in
# global flat order win, found from per-block tie counts and their exclusive prefix sum.


@helper
def _ukey(ptr, offs, m):
    x = tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)  # fp16/bf16 widen to fp32 exactly
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int order == float order
    return (key ^ -2147483648).to(tl.uint32, bitcast=True)  # unsigned order == float order


@helper
def _state_key(state):
    """The key bits found so far (held in an int64 on the device) as a uint32 key."""
    return tl.load(state).to(tl.uint32)


@triton.jit
def _topk_hist_kernel(
    tab, dyn, n_rows, state, hist, blk0, SHIFT: tl.constexpr,
    D: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    k = _ukey(operand_ptr(tab, dyn, LAYOUT, 0, t, D, ALIGN), offs, m)
    if SHIFT < 24:
        prefix = _state_key(state)
        m = m & ((k >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    digit = ((k >> SHIFT) & 255).to(tl.int32)
    h = tl.histogram(tl.where(m, digit, 256), 512)  # non-matching keys land in bins >= 256
    bins = tl.arange(0, 512)
    tl.atomic_add(hist + bins, h.to(tl.int64), mask=(bins < 256) & (h > 0))


@triton.jit
def _topk_select_kernel(state, hist, SHIFT: tl.constexpr):
    bins = tl.arange(0, 256)
    h = tl.load(hist + bins)
    kr = tl.load(state + 1)
    total = tl.sum(h, axis=0)
    above = total - tl.cumsum(h, axis=0)  # keys with a larger digit
    hit = (above < kr) & (above + h >= kr)
    d = tl.max(tl.where(hit, bins, -1), axis=0)
    above_d = tl.sum(tl.where(bins == d, above, 0), axis=0)
    prefix = tl.load(state)
    tl.store(state, prefix | (d.to(tl.int64) << SHIFT))
    tl.store(state + 1, kr - above_d)
    tl.store(hist + bins, tl.zeros([256], dtype=tl.int64))


@triton.jit
def _topk_ties_kernel(
    tab, dyn, n_rows, state, ties, blk0, D: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    t, offs, m, gb = block_info_ranked(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    k = _ukey(operand_ptr(tab, dyn, LAYOUT, 0, t, D, ALIGN), offs, m)
    thr = _state_key(state)
    eq = (m & (k == thr)).to(tl.int64)
    tl.store(ties + gb, tl.sum(eq, axis=0))


@triton.jit
def _topk_write_kernel(
    tab, dyn, n_rows, state, ties_before, blk0,
    D: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    t, start = block_start(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    n = row_field(tab, t, C_NUMEL, LAYOUT)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.full([BLOCK], 1, tl.int1) if EVEN else offs < n
    gb = block_rank(tab, t, start, BLOCK, LAYOUT)
    k = _ukey(operand_ptr(tab, dyn, LAYOUT, 0, t, D, ALIGN), offs, m)
    thr = _state_key(state)
    q = tl.load(state + 1)
    eq = (m & (k == thr)).to(tl.int64)
    rank = tl.load(ties_before + gb) + tl.cumsum(eq, axis=0) - eq
    keep = m & ((k > thr) | ((eq != 0) & (rank < q)))
    packed = _pack(tl.reshape(keep.to(tl.int32), [BLOCK // 8, 8]), BLOCK)
    bytes_ = (start >> 3) + tl.arange(0, BLOCK // 8).to(tl.int64)
    tl.store(operand_ptr(tab, dyn, LAYOUT, 1, t, tl.uint8, ALIGN) + bytes_, packed, mask=bytes_ * 8 < n)


@register("topk_mask", "triton")
@on_device
def topk_mask(scores: list[Tensor], k: int) -> list[Tensor]:
    """Exact global top-``k`` mask, bit-packed, ties to the earliest; see :func:`fastclu.ops.topk_mask`."""
    outs = _empty_masks(scores)
    if not scores:
        return outs
    if k == 0:
        for o in outs:
            o.zero_()
        return outs
    dev = scores[0].device
    gs, total = groups([scores, outs], dynamic=TABLES["topk_mask"].dynamic)
    state = torch.tensor([0, k], dtype=torch.int64).to(dev)
    hist = torch.zeros(256, dtype=torch.int64, device=dev)
    for shift in range(24, -1, -8):
        for g in gs:
            if g.n_blocks:
                launch(_topk_hist_kernel, g, 
                    *table_args(g), state, hist,
                    SHIFT=shift, D=tl_dtype(g.dtypes[0]), BLOCK=BLOCK,
                )  # fmt: skip
        _topk_select_kernel[(1,)](state, hist, SHIFT=shift)
    ties = mt.alloc(max(total, 1), torch.int64, dev)
    for g in gs:
        if g.n_blocks:
            launch(_topk_ties_kernel, g, 
                *table_args(g), state, ties,
                D=tl_dtype(g.dtypes[0]), BLOCK=BLOCK,
            )  # fmt: skip
    # Integer prefix sum over a few values per block: exact, and tiny next to the scores.
    ties_before = torch.cumsum(ties, 0) - ties
    for g in gs:
        if g.n_blocks:
            launch(_topk_write_kernel, g, 
                *table_args(g), state, ties_before,
                D=tl_dtype(g.dtypes[0]), BLOCK=BLOCK,
            )  # fmt: skip
    return outs
