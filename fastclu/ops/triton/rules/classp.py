"""CLASSP (arXiv 2405.09637), per weight: where ``g * g > threshold``, ``acc += |g|**p`` and
``theta -= lr * g / (acc + eps)**(1/p)`` (or ``theta -= lr * g`` without scaling); elsewhere
neither the weight nor ``acc`` moves.

Slots (:data:`fastclu.ops.rules.RULES`): h0 threshold, h1 p, h2 1/p, h3 eps. Switches: F0
scaling, F1 power mode (0: p = 1, no powers; 1: p = 2, a square and a correctly rounded square
root; 2: any other p, as exp(p * log x)). State row: acc.
"""

from __future__ import annotations

import triton.language as tl

from fastclu.ops.triton._multitensor import helper, operand_ptr
from fastclu.ops.triton._rows import ROW_STATE0


@helper
def _general_pow(x, p):
    """``x ** p`` for ``x >= 0`` or NaN, ``p > 0`` (0 ** p = 0 without a log of 0, which the
    interpreter warns about; NaN stays NaN)."""
    return tl.where(x == 0.0, 0.0, tl.exp(p * tl.log(tl.where(x == 0.0, 1.0, x))))


@helper
def _pow(x, mode: tl.constexpr, p):
    if mode == 0:
        return x
    elif mode == 1:
        return x * x
    else:
        return _general_pow(x, p)


@helper
def _root(x, mode: tl.constexpr, inv_p):
    if mode == 0:
        return x
    elif mode == 1:
        return tl.sqrt_rn(x)
    else:
        return _general_pow(x, inv_p)


@helper
def update(
    theta, g, lr32, lr64, tab, LAYOUT, t, offs, m, go, coef,
    h0, h0_lo, h1, h1_lo, h2, h2_lo, h3, h3_lo, h4, h4_lo, h5, h5_lo,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
    DB0: tl.constexpr, DB1: tl.constexpr, DB2: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    # a comparison, not a product: a NaN gradient does not pass the gate
    on = (g * g) > h0
    upd = g
    if F0:
        ap = operand_ptr(tab, tab, LAYOUT, ROW_STATE0, t, DB0, ALIGN)  # acc
        acc_raw = tl.load(ap + offs, mask=m, other=0.0)
        acc = acc_raw.to(tl.float32) + _pow(tl.abs(g), F1, h1)
        tl.store(ap + offs, tl.where(go & on, acc.to(DB0), acc_raw), mask=m)
        upd = g / _root(acc + h3, F1, h2)
    return tl.where(on, theta + (-lr32) * upd, theta)
