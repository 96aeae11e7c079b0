"""fisher_accumulate_: diagonal Fisher / saliency accumulation as one multi-tensor launch per dtype group."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.tables import TABLES
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
def _fisher_kernel(
    tab, dyn, n_rows, s_ptr, s_val,
    blk0, S_T: tl.constexpr, POWER: tl.constexpr, DF: tl.constexpr, DG: tl.constexpr, BLOCK: tl.constexpr,
    EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    fp = operand_ptr(tab, dyn, LAYOUT, 0, t, DF, ALIGN)
    s = load_scalar(s_ptr, s_val, S_T)
    g = tl.load(operand_ptr(tab, dyn, LAYOUT, 1, t, DG, ALIGN) + offs, mask=m).to(tl.float32)
    v = g * g if POWER == 2 else tl.abs(g)
    f = tl.load(fp + offs, mask=m).to(tl.float32)
    tl.store(fp + offs, (f + s * v).to(DF), mask=m)


@register("fisher_accumulate_", "triton")
@on_device
def fisher_accumulate_(fisher: list[Tensor], grads: list[Tensor], scale: float | Tensor, *, power: int) -> None:
    """``fisher += scale * g**2`` (or ``|g|``); see :func:`fastclu.ops.fisher_accumulate_`."""
    if not fisher:
        return
    gs, _ = groups([fisher, grads], dynamic=TABLES["fisher_accumulate"].dynamic)
    for g in gs:
        if g.n_blocks == 0:
            continue
        sp, sv, st = scalar_arg(scale, fisher[0].device, g.tab)
        launch(_fisher_kernel, g, 
            *table_args(g), sp, sv,
            S_T=st, POWER=power, DF=tl_dtype(g.dtypes[0]), DG=tl_dtype(g.dtypes[1]), BLOCK=BLOCK,
        )  # fmt: skip
