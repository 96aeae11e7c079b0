"""Reference ``fd_hvp_``: central finite-difference Hessian-vector product."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.reference._util import Scalar, all_fp32, as_compute, compute_dtype


@register("fd_hvp_", "reference")
def fd_hvp_(
    out: list[Tensor], grads_plus: list[Tensor], grads_minus: list[Tensor], eps: Scalar, *, accumulate: bool
) -> None:
    """``out = (g_plus - g_minus) / (2 * eps)`` (``out +=`` when ``accumulate``).

    Math in fp32 (fp64 if any operand is fp64); ``2 * eps`` is formed in that dtype first.
    Without ``accumulate`` the old content of ``out`` is never read (it may be garbage/NaN).
    """
    if all_fp32(out, grads_plus, grads_minus):
        _foreach(out, grads_plus, grads_minus, eps, accumulate)
    else:
        _loop(out, grads_plus, grads_minus, eps, accumulate)


def _loop(out: list[Tensor], gp: list[Tensor], gm: list[Tensor], eps: Scalar, accumulate: bool) -> None:
    for o, p, m in zip(out, gp, gm):
        if o.numel() == 0:
            continue
        dt = compute_dtype(o, p, m)
        h = (p.to(dt) - m.to(dt)) / (as_compute(eps, dt) * 2.0)
        o.copy_(o.to(dt) + h if accumulate else h)


def _foreach(out: list[Tensor], gp: list[Tensor], gm: list[Tensor], eps: Scalar, accumulate: bool) -> None:
    h = torch._foreach_sub(gp, gm)
    torch._foreach_div_(h, as_compute(eps, torch.float32) * 2.0)
    if accumulate:
        torch._foreach_add_(out, h)
    else:
        torch._foreach_copy_(out, h)
