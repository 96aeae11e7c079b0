"""Reference ``fisher_accumulate_``: diagonal Fisher / saliency accumulation."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.reference._util import Scalar, all_fp32, as_compute, compute_dtype


@register("fisher_accumulate_", "reference")
def fisher_accumulate_(fisher: list[Tensor], grads: list[Tensor], scale: Scalar, *, power: int) -> None:
    """``fisher += scale * (g * g)`` (power 2) or ``fisher += scale * |g|`` (power 1).

    Math in fp32 (fp64 if either operand is fp64), in that order: the square is rounded
    before the scale is applied, then the sum is rounded once into ``fisher``'s dtype.
    """
    if all_fp32(fisher, grads):
        _foreach(fisher, grads, scale, power)
    else:
        _loop(fisher, grads, scale, power)


def _loop(fisher: list[Tensor], grads: list[Tensor], scale: Scalar, power: int) -> None:
    for f, g in zip(fisher, grads):
        if f.numel() == 0:
            continue
        dt = compute_dtype(f, g)
        g32 = g.to(dt)
        term = g32 * g32 if power == 2 else g32.abs()
        f.copy_(f.to(dt) + as_compute(scale, dt) * term)


def _foreach(fisher: list[Tensor], grads: list[Tensor], scale: Scalar, power: int) -> None:
    term = torch._foreach_mul(grads, grads) if power == 2 else torch._foreach_abs(grads)
    torch._foreach_mul_(term, as_compute(scale, torch.float32))
    torch._foreach_add_(fisher, term)
