"""Fast-slow (Lookahead) synchronisation as one multi-tensor Triton launch per dtype group."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.triton._multitensor import (
    BLOCK,
    block_info,
    groups,
    launch,
    load_scalar,
    on_device,
    operand_ptr,
    scalar_arg,
    table_args,
    tl_dtype,
)


@triton.jit
def _lerp_sync_kernel(
    tab, dyn, n_rows, beta_ptr, beta_val,
    blk0, BETA_T: tl.constexpr, DS: tl.constexpr, DF: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    sp = operand_ptr(tab, dyn, LAYOUT, 0, t, DS, ALIGN)
    fp = operand_ptr(tab, dyn, LAYOUT, 1, t, DF, ALIGN)
    beta = load_scalar(beta_ptr, beta_val, BETA_T)
    s = tl.load(sp + offs, mask=m).to(tl.float32)
    f = tl.load(fp + offs, mask=m).to(tl.float32)
    new = (s + beta * (f - s)).to(DS)
    tl.store(sp + offs, new, mask=m)
    # fast takes the slow weights as stored (rounded to slow's dtype first), as fast.copy_(slow) would
    tl.store(fp + offs, new.to(tl.float32).to(DF), mask=m)


@register("lerp_sync_", "triton")
@on_device
def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: float | Tensor) -> None:
    """``slow += beta * (fast - slow); fast = slow``; see :func:`fastclu.ops.lerp_sync_`."""
    if not slow:
        return
    gs, _ = groups([slow, fast])
    for g in gs:
        if g.n_blocks == 0:
            continue
        bp, bv, bt = scalar_arg(beta, slow[0].device, g.tab)
        launch(_lerp_sync_kernel, g, 
            *table_args(g), bp, bv,
            BETA_T=bt, DS=tl_dtype(g.dtypes[0]), DF=tl_dtype(g.dtypes[1]), BLOCK=BLOCK,
        )  # fmt: skip
