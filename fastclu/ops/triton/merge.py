"""P&M merge: ``merge_`` and ``merge_stats`` (the two sums of alpha, deterministic) as multi-tensor launches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import (
    BLOCK,
    block_info,
    block_info_ranked,
    groups,
    launch,
    load_scalar,
    on_device,
    operand_ptr,
    scalar_arg,
    table_args,
    tl_dtype,
)
from fastclu.ops.triton._reduce import dsum as _dsum
from fastclu.ops.triton._reduce import sum_partials


@triton.jit
def _merge_kernel(
    tab, dyn, n_rows, a_ptr, a_val,
    blk0, A_T: tl.constexpr, DP: tl.constexpr, DA: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    pp = operand_ptr(tab, dyn, LAYOUT, 0, t, DP, ALIGN)
    alpha = load_scalar(a_ptr, a_val, A_T)
    p = tl.load(pp + offs, mask=m).to(tl.float32)
    a = tl.load(operand_ptr(tab, dyn, LAYOUT, 1, t, DA, ALIGN) + offs, mask=m).to(tl.float32)
    tl.store(pp + offs, (a + alpha * (p - a)).to(DP), mask=m)


@register("merge_", "triton")
@on_device
def merge_(params: list[Tensor], anchor: list[Tensor], alpha: float | Tensor) -> None:
    """``theta = anchor + alpha * (theta - anchor)``; see :func:`fastclu.ops.merge_`."""
    if not params:
        return
    gs, _ = groups([params, anchor])
    for g in gs:
        if g.n_blocks == 0:
            continue
        ap, av, at = scalar_arg(alpha, params[0].device, g.tab)
        launch(_merge_kernel, g, 
            *table_args(g), ap, av,
            A_T=at, DP=tl_dtype(g.dtypes[0]), DA=tl_dtype(g.dtypes[1]), BLOCK=BLOCK,
        )  # fmt: skip


@triton.jit
def _merge_stats_kernel(
    tab, dyn, n_rows, part,
    blk0, DP: tl.constexpr, DA: tl.constexpr, DF: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0) + blk0
    t, offs, m, gb = block_info_ranked(tab, n_rows, pid, BLOCK, EVEN, LAYOUT)
    p = tl.load(operand_ptr(tab, dyn, LAYOUT, 0, t, DP, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(operand_ptr(tab, dyn, LAYOUT, 1, t, DA, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    fs = tl.load(operand_ptr(tab, dyn, LAYOUT, 2, t, DF, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
    ft = tl.load(operand_ptr(tab, dyn, LAYOUT, 3, t, DT, ALIGN) + offs, mask=m, other=0.0).to(tl.float32)
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
            *table_args(g), part,
            DP=d[0], DA=d[1], DF=d[2], DT=d[3], BLOCK=BLOCK,
        )  # fmt: skip
    out = sum_partials(part, total, 2)
    return out[0], out[1]
