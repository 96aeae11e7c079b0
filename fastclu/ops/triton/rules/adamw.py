"""AdamW (decoupled weight decay, optional AMSGrad), torch.optim.adam's single-tensor op order.

The per-tensor step size ``lr / bc1`` and ``sqrt(bc2)`` come in ``coef`` (formed once per tensor
by ``combine._step_kernel``, which also increments the step counters).
"""

from __future__ import annotations

import triton.language as tl

from fastclu.ops.triton._multitensor import f64, helper, operand_ptr
from fastclu.ops.triton._rows import ROW_STATE0, ROW_STATE1, ROW_STATE_MAX


@helper
def update(
    theta, g, lr32, lr64, tab, LAYOUT, t, offs, m, go, coef, wd, momentum, one_minus_damp,
    b1_hi, b1_lo, b2_hi, b2_lo, eps, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
    INIT_MOM: tl.constexpr, AMSGRAD: tl.constexpr, DB0: tl.constexpr, DB1: tl.constexpr, DB2: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    b0p = operand_ptr(tab, tab, LAYOUT, ROW_STATE0, t, DB0, ALIGN)  # exp_avg
    b1p = operand_ptr(tab, tab, LAYOUT, ROW_STATE1, t, DB1, ALIGN)  # exp_avg_sq
    step_size = tl.load(coef + 2 * t)
    bc2_sqrt = tl.load(coef + 2 * t + 1)
    beta1 = f64(b1_hi, b1_lo)
    beta2 = f64(b2_hi, b2_lo)
    if HAS_WD:
        theta = theta * (1.0 - lr64 * tl.cast(wd, tl.float64)).to(tl.float32)
    ea = tl.load(b0p + offs, mask=m, other=0.0).to(tl.float32)
    eas = tl.load(b1p + offs, mask=m, other=0.0).to(tl.float32)
    # torch.lerp(ea, g, w), with its switch of formula at w = 0.5
    w = (1.0 - beta1).to(tl.float32)
    ea_new = tl.where(w < 0.5, ea + w * (g - ea), g - (g - ea) * (1.0 - w))
    eas_new = eas * beta2.to(tl.float32) + ((1.0 - beta2).to(tl.float32) * g) * g
    tl.store(b0p + offs, ea_new.to(DB0), mask=go)
    tl.store(b1p + offs, eas_new.to(DB1), mask=go)
    v = eas_new
    if AMSGRAD:
        b2p = operand_ptr(tab, tab, LAYOUT, ROW_STATE_MAX, t, DB2, ALIGN)
        vmax = tl.load(b2p + offs, mask=m, other=0.0).to(tl.float32)
        # torch.maximum propagates NaN, tl.maximum drops it (issue 17)
        v = tl.maximum(vmax, eas_new, propagate_nan=tl.PropagateNan.ALL)
        tl.store(b2p + offs, v.to(DB2), mask=go)
    denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    return theta + (-step_size * ea_new) / denom
