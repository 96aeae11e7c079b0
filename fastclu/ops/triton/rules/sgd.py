"""SGD with momentum / dampening / Nesterov / weight decay, torch.optim.SGD's op order.

Slots (:data:`fastclu.ops.rules.RULES`): h0 weight_decay, h1 momentum, h2 1 - dampening.
Switches: F0 weight decay, F1 momentum, F2 Nesterov, F3 first step (buffer = d_p).
"""

from __future__ import annotations

import triton.language as tl

from fastclu.ops.triton._multitensor import helper, operand_ptr
from fastclu.ops.triton._rows import ROW_STATE0


@helper
def update(
    theta, g, lr32, lr64, tab, LAYOUT, t, offs, m, go, coef,
    h0, h0_lo, h1, h1_lo, h2, h2_lo, h3, h3_lo, h4, h4_lo, h5, h5_lo,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
    DB0: tl.constexpr, DB1: tl.constexpr, DB2: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    if F0:
        g = g + h0 * theta
    if F1:
        b0p = operand_ptr(tab, tab, LAYOUT, ROW_STATE0, t, DB0, ALIGN)  # momentum_buffer
        # F3: torch's first step (buf is None), buf = d_p
        if F3:
            buf = g
            tl.store(b0p + offs, buf.to(DB0), mask=go)  # nothing loaded to write back
        else:
            buf_raw = tl.load(b0p + offs, mask=m, other=0.0)
            buf = buf_raw.to(tl.float32) * h1 + h2 * g
            tl.store(b0p + offs, tl.where(go, buf.to(DB0), buf_raw), mask=m)
        g = g + h1 * buf if F2 else buf
    return theta + (-lr32) * g
