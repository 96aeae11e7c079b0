"""MEHL-Soup: ``soup_combine_`` and ``soup_coef_grads`` (deterministic) as multi-tensor launches.

The K ingredient differences are operand rows ``DIFF0 + k`` of one table
(:class:`~fastclu.ops.tables.SoupCombineRow`, :class:`~fastclu.ops.tables.SoupGradRow`); K is a
constexpr, so the loop over the ingredients is unrolled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.tables import TABLES, SoupCombineRow, SoupGradRow
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import (
    BLOCK,
    C_INDEX,
    C_NUMEL,
    block_info,
    block_info_ranked,
    block_rank,
    groups,
    launch,
    on_device,
    operand_ptr,
    row_field,
    table_args,
    tl_dtype,
)
from fastclu.ops.triton._reduce import dsum as _dsum

_OUT = tl.constexpr(int(SoupCombineRow.OUT))
_BASE = tl.constexpr(int(SoupCombineRow.BASE))
_C_DIFF0 = tl.constexpr(int(SoupCombineRow.DIFF0))
_GRADS = tl.constexpr(int(SoupGradRow.GRADS))
_G_DIFF0 = tl.constexpr(int(SoupGradRow.DIFF0))

SEGMENT_BLOCK = 1024


@triton.jit
def _soup_combine_kernel(
    tab, dyn, n_rows, coefs, n_cols, col_stride,
    blk0, K: tl.constexpr, DO: tl.constexpr, DB: tl.constexpr, DD: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    col = row_field(tab, t, C_INDEX, LAYOUT) * col_stride
    acc = tl.load(operand_ptr(tab, dyn, LAYOUT, _BASE, t, DB, ALIGN) + offs, mask=m).to(tl.float32)
    for k in tl.static_range(K):
        c = tl.load(coefs + k * n_cols + col)
        d = tl.load(operand_ptr(tab, dyn, LAYOUT, _C_DIFF0 + k, t, DD, ALIGN) + offs, mask=m).to(tl.float32)
        acc += c * d
    tl.store(operand_ptr(tab, dyn, LAYOUT, _OUT, t, DO, ALIGN) + offs, acc.to(DO), mask=m)


@register("soup_combine_", "triton")
@on_device
def soup_combine_(out: list[Tensor], base: list[Tensor], diffs: list[list[Tensor]], coefs: Tensor) -> None:
    """``out = base + sum_k coefs[k, l] * diffs[k]``; see :func:`fastclu.ops.soup_combine_`."""
    if not out:
        return
    K, n_cols = len(diffs), coefs.shape[1]
    gs, _ = groups([out, base, *diffs], dynamic=TABLES["soup_combine"].dynamic)
    for g in gs:
        if g.n_blocks == 0:
            continue
        launch(_soup_combine_kernel, g,
            *table_args(g), coefs, n_cols, int(n_cols > 1),
            K=K, DO=tl_dtype(g.dtypes[0]), DB=tl_dtype(g.dtypes[1]), DD=tl_dtype(g.dtypes[2]), BLOCK=BLOCK,
        )  # fmt: skip


@triton.jit
def _soup_partials_kernel(
    tab, dyn, n_rows, part,
    blk0, K: tl.constexpr, DG: tl.constexpr, DD: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    t, offs, m, gb = block_info_ranked(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    g = tl.load(operand_ptr(tab, dyn, LAYOUT, _GRADS, t, DG, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        d = tl.load(operand_ptr(tab, dyn, LAYOUT, _G_DIFF0 + k, t, DD, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(part + gb * K + k, _dsum(g * d))


@triton.jit
def _soup_segments_kernel(
    tab, part, seg_out, n_tensors, max_count, K: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    LAYOUT: tl.constexpr,
):  # fmt: skip
    """seg_out[k, i] = sum of tensor i's block partials (fp64, blocks in increasing order), for
    the tensor i of each row of one group: its blocks have the global ranks rank0 .. rank0 + n - 1."""
    t = tl.program_id(0)
    k = tl.program_id(1)
    i = row_field(tab, t, C_INDEX, LAYOUT)
    f = block_rank(tab, t, 0, CHUNK, LAYOUT)
    n = (row_field(tab, t, C_NUMEL, LAYOUT) + CHUNK - 1) // CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    # bounded by the host's largest count (not the loaded one): the interpreter needs a host bound
    for b0 in range(0, max_count, BLOCK):
        b = b0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(part + (f + b) * K + k, mask=b < n, other=0.0)
    tl.store(seg_out + k * n_tensors + i, tl.sum(acc, axis=0))


@register("soup_coef_grads", "triton")
@on_device
def soup_coef_grads(grads: list[Tensor], diffs: list[list[Tensor]], *, layerwise: bool) -> Tensor:
    """fp32 ``[K, L]`` (or ``[K, 1]``) inner products; see :func:`fastclu.ops.soup_coef_grads`."""
    K, L = len(diffs), len(grads)
    dev = grads[0].device if grads else torch.device("cpu")
    if L == 0:
        return torch.zeros(K, L if layerwise else 1, dtype=torch.float32, device=dev)
    gs, total = groups([grads, *diffs], dynamic=TABLES["soup_coef_grads"].dynamic)
    part = mt.alloc((max(total, 1), K), torch.float64, dev)
    for g in gs:
        if g.n_blocks == 0:
            continue
        launch(_soup_partials_kernel, g,
            *table_args(g), part,
            K=K, DG=tl_dtype(g.dtypes[0]), DD=tl_dtype(g.dtypes[1]), BLOCK=BLOCK,
        )  # fmt: skip
    max_count = triton.cdiv(max(map(Tensor.numel, grads)), BLOCK)
    per = mt.alloc((K, L), torch.float64, dev)
    # every tensor has a row in exactly one group (empty ones too: 0 blocks, a 0 entry)
    for g in gs:
        _soup_segments_kernel[(g.n_rows, K)](
            g.tab, part, per, L, max_count, K=K, BLOCK=SEGMENT_BLOCK, CHUNK=BLOCK, LAYOUT=mt.layout(g)
        )
    # the layer sum is torch's fixed-order fp64 reduction of [K, L]: deterministic as well
    return (per if layerwise else per.sum(1, keepdim=True)).to(torch.float32)
