"""gram: fp32 ``[R, R]`` Gram matrix of the masked role gradients, deterministic (see :mod:`._reduce`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.tables import TABLES, GramRow
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import (
    BLOCK,
    C_NUMEL,
    block_rank,
    block_start,
    groups,
    helper,
    launch,
    on_device,
    operand_ptr,
    row_field,
    table_args,
    tl_dtype,
)
from fastclu.ops.triton._reduce import dsum as _dsum
from fastclu.ops.triton._reduce import sum_partials
from fastclu.ops.triton.masks import load_bits

_MASK = tl.constexpr(int(GramRow.MASK))


@helper
def _store2(base, R: tl.constexpr, r: tl.constexpr, c: tl.constexpr, v):
    tl.store(base + r * R + c, v)
    tl.store(base + c * R + r, v)


@triton.jit
def _gram_kernel(
    tab, dyn, n_rows, part,
    blk0, R: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
    HAS_MASK: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    # block_info_ranked, with the block start kept for the mask bytes
    t, start = block_start(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = tl.full([BLOCK], 1, tl.int1) if EVEN else offs < row_field(tab, t, C_NUMEL, LAYOUT)
    gb = block_rank(tab, t, start, BLOCK, LAYOUT)
    if HAS_MASK:
        bits = load_bits(operand_ptr(tab, dyn, LAYOUT, _MASK, t, tl.uint8, ALIGN), tab, t, start, BLOCK, EVEN, LAYOUT)
    else:
        bits = tl.full([BLOCK], 1, tl.int1)
    g0 = tl.load(operand_ptr(tab, dyn, LAYOUT, 0, t, D0, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    if M0:
        g0 = tl.where(bits, g0, 0.0)  # selection: inf/NaN under a 0 bit drop out
    g1 = g0
    g2 = g0
    g3 = g0
    if R > 1:
        g1 = tl.load(operand_ptr(tab, dyn, LAYOUT, 1, t, D1, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        if M1:
            g1 = tl.where(bits, g1, 0.0)  # selection: inf/NaN under a 0 bit drop out
    if R > 2:
        g2 = tl.load(operand_ptr(tab, dyn, LAYOUT, 2, t, D2, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        if M2:
            g2 = tl.where(bits, g2, 0.0)  # selection: inf/NaN under a 0 bit drop out
    if R > 3:
        g3 = tl.load(operand_ptr(tab, dyn, LAYOUT, 3, t, D3, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
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
    gs, total = groups([*grads, *[None] * (4 - R), mask], dynamic=TABLES["gram"].dynamic)
    part = mt.alloc((max(total, 1), R * R), torch.float64, dev)
    for g in gs:
        if g.n_blocks == 0:
            continue
        dts = [tl_dtype(d) for d in g.dtypes[:R]] + [tl.float32] * (4 - R)
        launch(_gram_kernel, g, 
            *table_args(g), part,
            R=R, M0=flags[0], M1=flags[1], M2=flags[2], M3=flags[3], HAS_MASK=mask is not None,
            D0=dts[0], D1=dts[1], D2=dts[2], D3=dts[3], BLOCK=BLOCK,
        )  # fmt: skip
    # Both triangles are summed from identical partials (_store2 writes each pair twice) in the
    # same order, so the result is exactly symmetric as it is (tested): no host-side mirror ops.
    return sum_partials(part, total, R * R).view(R, R)
