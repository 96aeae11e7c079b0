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
    tl_dtype,
)


@triton.jit
def _lerp_sync_kernel(
    ptrs, numel, blk_tensor, blk_start, n_tensors, beta_ptr, beta_val,
    blk0, BETA_T: tl.constexpr, DS: tl.constexpr, DF: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(blk_tensor, blk_start, numel, tl.program_id(0) + blk0, BLOCK, EVEN)
    sp = operand_ptr(ptrs, n_tensors, 0, t, DS, ALIGN)
    fp = operand_ptr(ptrs, n_tensors, 1, t, DF, ALIGN)
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
        bp, bv, bt = scalar_arg(beta, slow[0].device, g.numel)
        launch(_lerp_sync_kernel, g, 
            g.ptrs, g.numel, g.blk_tensor, g.blk_start, g.n_tensors, bp, bv,
            BETA_T=bt, DS=tl_dtype(g.dtypes[0]), DF=tl_dtype(g.dtypes[1]), BLOCK=BLOCK,
        )  # fmt: skip
