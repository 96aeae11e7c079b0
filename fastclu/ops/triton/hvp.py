"""fd_hvp_: the central finite-difference Hessian-vector product as one multi-tensor launch per dtype group."""

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
def _fd_hvp_kernel(
    tab, dyn, n_rows, e_ptr, e_val,
    blk0, E_T: tl.constexpr, ACC: tl.constexpr, DO: tl.constexpr, DPL: tl.constexpr, DMI: tl.constexpr,
    BLOCK: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    t, offs, m = block_info(tab, n_rows, tl.program_id(0) + blk0, BLOCK, EVEN, LAYOUT)
    op = operand_ptr(tab, dyn, LAYOUT, 0, t, DO, ALIGN)
    eps = load_scalar(e_ptr, e_val, E_T)
    gp = tl.load(operand_ptr(tab, dyn, LAYOUT, 1, t, DPL, ALIGN) + offs, mask=m).to(tl.float32)
    gm = tl.load(operand_ptr(tab, dyn, LAYOUT, 2, t, DMI, ALIGN) + offs, mask=m).to(tl.float32)
    v = (gp - gm) / (2.0 * eps)
    if ACC:
        v = tl.load(op + offs, mask=m).to(tl.float32) + v
    tl.store(op + offs, v.to(DO), mask=m)


@register("fd_hvp_", "triton")
@on_device
def fd_hvp_(
    out: list[Tensor], grads_plus: list[Tensor], grads_minus: list[Tensor], eps: float | Tensor, *, accumulate: bool
) -> None:
    """``out (+)= (g_plus - g_minus) / (2 eps)``; see :func:`fastclu.ops.fd_hvp_`."""
    if not out:
        return
    gs, _ = groups([out, grads_plus, grads_minus], dynamic=TABLES["fd_hvp"].dynamic)
    for g in gs:
        if g.n_blocks == 0:
            continue
        ep, ev, et = scalar_arg(eps, out[0].device, g.tab)
        d = [tl_dtype(x) for x in g.dtypes]
        launch(_fd_hvp_kernel, g, 
            *table_args(g), ep, ev,
            E_T=et, ACC=bool(accumulate), DO=d[0], DPL=d[1], DMI=d[2], BLOCK=BLOCK,
        )  # fmt: skip
