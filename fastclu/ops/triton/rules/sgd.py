"""SGD with momentum / dampening / Nesterov / weight decay, torch.optim.SGD's op order."""

from __future__ import annotations

import triton.language as tl

from fastclu.ops.triton._multitensor import helper, operand_ptr
from fastclu.ops.triton._rows import ROW_STATE0


@helper
def update(
    theta, g, lr32, lr64, tab, LAYOUT, t, offs, m, go, coef, wd, momentum, one_minus_damp,
    b1_hi, b1_lo, b2_hi, b2_lo, eps, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
    INIT_MOM: tl.constexpr, AMSGRAD: tl.constexpr, DB0: tl.constexpr, DB1: tl.constexpr, DB2: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    if HAS_WD:
        g = g + wd * theta
    if HAS_MOM:
        b0p = operand_ptr(tab, tab, LAYOUT, ROW_STATE0, t, DB0, ALIGN)  # momentum_buffer
        # INIT_MOM: torch's first step (buf is None), buf = d_p
        buf = g if INIT_MOM else tl.load(b0p + offs, mask=m, other=0.0).to(tl.float32) * momentum + one_minus_damp * g
        tl.store(b0p + offs, buf.to(DB0), mask=go)
        g = g + momentum * buf if NESTEROV else buf
    return theta + (-lr32) * g
