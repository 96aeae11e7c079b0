"""AdamW (decoupled weight decay, optional AMSGrad), torch.optim.adam's single-tensor op order.

Slots (:data:`fastclu.ops.rules.RULES`): h0 weight_decay, h1 beta1, h2 beta2 (doubles), h3 eps.
Switches: F0 weight decay, F1 AMSGrad.

The step counters are incremented by a small per-tensor launch first (:func:`prepare`), which
also forms that tensor's step size ``lr / bc1`` and ``sqrt(bc2)`` (in fp64 from double-float
host scalars, as torch forms them in Python floats) into ``coef``; the main kernel reads those,
so no block races a counter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastclu.ops.rules import StepConfig
from fastclu.ops.triton import _multitensor as mt
from fastclu.ops.triton._multitensor import f64, helper, operand_ptr, slot_ptr
from fastclu.ops.triton._rows import ROW_STATE0, ROW_STATE1, ROW_STATE_MAX, ROW_STEP
from fastclu.ops.triton.rules import GroupLaunch, split_double

_TB = 256  # tensors per program of the step-counter kernel


@helper
def update(
    theta, g, lr32, lr64, tab, LAYOUT, t, offs, m, go, coef,
    h0, h0_lo, h1, h1_lo, h2, h2_lo, h3, h3_lo, h4, h4_lo, h5, h5_lo,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
    DB0: tl.constexpr, DB1: tl.constexpr, DB2: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    b0p = operand_ptr(tab, tab, LAYOUT, ROW_STATE0, t, DB0, ALIGN)  # exp_avg
    b1p = operand_ptr(tab, tab, LAYOUT, ROW_STATE1, t, DB1, ALIGN)  # exp_avg_sq
    step_size = tl.load(coef + 2 * t)
    bc2_sqrt = tl.load(coef + 2 * t + 1)
    beta1 = f64(h1, h1_lo)
    beta2 = f64(h2, h2_lo)
    if F0:
        theta = theta * (1.0 - lr64 * tl.cast(h0, tl.float64)).to(tl.float32)
    ea_raw = tl.load(b0p + offs, mask=m, other=0.0)
    eas_raw = tl.load(b1p + offs, mask=m, other=0.0)
    ea = ea_raw.to(tl.float32)
    eas = eas_raw.to(tl.float32)
    # torch.lerp(ea, g, w), with its switch of formula at w = 0.5
    w = (1.0 - beta1).to(tl.float32)
    ea_new = tl.where(w < 0.5, ea + w * (g - ea), g - (g - ea) * (1.0 - w))
    eas_new = eas * beta2.to(tl.float32) + ((1.0 - beta2).to(tl.float32) * g) * g
    tl.store(b0p + offs, tl.where(go, ea_new.to(DB0), ea_raw), mask=m)
    tl.store(b1p + offs, tl.where(go, eas_new.to(DB1), eas_raw), mask=m)
    v = eas_new
    if F1:
        b2p = operand_ptr(tab, tab, LAYOUT, ROW_STATE_MAX, t, DB2, ALIGN)
        vmax_raw = tl.load(b2p + offs, mask=m, other=0.0)
        vmax = vmax_raw.to(tl.float32)
        # torch.maximum propagates NaN, tl.maximum drops it (issue 17)
        v = tl.maximum(vmax, eas_new, propagate_nan=tl.PropagateNan.ALL)
        tl.store(b2p + offs, tl.where(go, v.to(DB2), vmax_raw), mask=m)
    denom = tl.sqrt_rn(v) / bc2_sqrt + h3
    return theta + (-step_size * ea_new) / denom


@helper
def _pow_int(b, n):
    """fp64 ``b ** n`` for integers ``0 <= n < 2**63`` (square and multiply).

    An fp32 counter stops growing at 2**24 (``2**24 + 1`` rounds back), so ``n`` reaches 2**24
    itself: 24 bits of ``n`` would read it as 0 and give ``b ** n == 1``, a zero bias correction.
    A loaded counter can be any fp32 value: 2**32 read with 32 bits would do the same, hence 63.
    """
    r = tl.zeros_like(b) + 1.0
    for _ in tl.static_range(63):
        r = tl.where((n & 1) == 1, r * b, r)
        b = b * b
        n = n >> 1
    return r


@triton.jit
def _step_kernel(
    tab, n_tensors, fi_ptr, lr_ptr, lr_hi, lr_lo, b1_hi, b1_lo, b2_hi, b2_lo, coef,
    HAS_FI: tl.constexpr, LR_T: tl.constexpr, DST: tl.constexpr, TB: tl.constexpr, LAYOUT: tl.constexpr,
):  # fmt: skip
    """Per tensor: step += 1 (unless AMP found inf), then AdamW's step size and sqrt(bc2) into coef."""
    t = tl.program_id(0) * TB + tl.arange(0, TB)
    ok = t < n_tensors
    sp = tl.load(slot_ptr(tab, t, ROW_STEP, LAYOUT), mask=ok, other=0).to(tl.pointer_type(DST))
    old = tl.load(sp, mask=ok, other=0.0).to(tl.float32)
    step = old + 1.0
    if HAS_FI:
        # a skipped step keeps its counter (the main kernel then moves nothing); the old value
        # itself, since (old + 1) - 1 is not old where fp32 rounds (at 2**24)
        fi = tl.zeros([TB], dtype=tl.float32) + tl.load(fi_ptr).to(tl.float32)
        step = tl.where(fi == 0.0, step, old)
    tl.store(sp, step.to(DST), mask=ok)
    # issue 17: clamped to 2**62 before the cast (beyond, beta ** n is 0 in fp64 anyway); max: avoid
    # 1 / 0 on a skipped first step
    n = tl.maximum(tl.minimum(step, 4.611686018427388e18).to(tl.int64), 1)
    lr64 = tl.load(lr_ptr).to(tl.float32).to(tl.float64) if LR_T else f64(lr_hi, lr_lo)
    # as torch does in Python floats: 1 - beta ** step, lr / bc1, sqrt(bc2), then rounded to fp32
    bc1 = 1.0 - _pow_int(tl.zeros([TB], dtype=tl.float64) + f64(b1_hi, b1_lo), n)
    bc2 = 1.0 - _pow_int(tl.zeros([TB], dtype=tl.float64) + f64(b2_hi, b2_lo), n)
    tl.store(coef + 2 * t, (lr64 / bc1).to(tl.float32), mask=ok)
    tl.store(coef + 2 * t + 1, tl.sqrt(bc2).to(tl.float32), mask=ok)


def _host_coef(steps: list[Tensor], lr: float | Tensor, betas: tuple[float, float], found_inf: Tensor | None) -> Tensor:
    """Host counterpart of _step_kernel for CPU step counters: fp32 ``[n_tensors, 2]`` on the CPU."""
    skip = found_inf is not None and float(found_inf) != 0.0
    lr_f = float(lr)
    out = []
    for st in steps:
        if not skip:
            st += 1
        n = max(float(st), 1.0)
        bc1 = 1 - betas[0] ** n
        bc2 = 1 - betas[1] ** n
        out.append((lr_f / bc1, bc2**0.5))
    return torch.tensor(out, dtype=torch.float32).reshape(len(steps), 2)


def prepare(
    steps: list[Tensor] | None, cfg: StepConfig, lr: float | Tensor, found_inf: Tensor | None, dev: torch.device
) -> tuple[list[Tensor] | None, Callable[[GroupLaunch], Tensor | None]]:
    """Count the steps and form each tensor's ``(lr / bc1, sqrt(bc2))`` (see the module docstring)."""
    assert steps is not None
    if any(st.device != dev for st in steps):
        # torch.optim keeps non-capturable step counters on the CPU: count on the host (as torch
        # does, a host read of found_inf included) and ship the per-tensor coefficients over
        host = _host_coef(steps, lr, cfg.betas, found_inf)
        return None, lambda gl: host[list(gl.group.members)].to(gl.dev, non_blocking=True)
    b1_hi, b1_lo = split_double(cfg.betas[0])
    b2_hi, b2_lo = split_double(cfg.betas[1])

    def coef(gl: GroupLaunch) -> Tensor | None:
        g = gl.group
        if not g.n_tensors:
            return None
        # counters first (every tensor's, empty ones included, as torch increments them all);
        # the main kernel then reads per-tensor coefficients instead of the racing counters
        out = mt.alloc((g.n_tensors, 2), torch.float32, gl.dev)
        lr_p, _, lr_hi, lr_lo, lr_t = gl.lr
        _step_kernel[(triton.cdiv(g.n_tensors, _TB),)](
            g.tab, g.n_tensors, gl.dummy if gl.found_inf is None else gl.found_inf, lr_p, lr_hi, lr_lo,
            b1_hi, b1_lo, b2_hi, b2_lo, out, HAS_FI=gl.found_inf is not None, LR_T=lr_t, DST=gl.step_dtype, TB=_TB, LAYOUT=mt.layout(g),
        )  # fmt: skip
        return out

    return steps, coef
