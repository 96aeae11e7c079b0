"""Reference P&M merge: ``merge_stats`` (the two sums of alpha) and ``merge_``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.reference._util import Scalar, all_fp32, as_compute, compute_dtype


@register("merge_stats", "reference")
def merge_stats(
    params: list[Tensor], anchor: list[Tensor], fisher_sum: list[Tensor], fisher_theta_sum: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """``num = sum d * (S_Ftheta - anchor * S_F)``, ``den = sum d**2 * S_F`` with ``d = theta - anchor``.

    Everything (including ``d``) in fp64, so the result is the fp32 rounding of a near-exact sum.
    Returns two fp32 0-d tensors on the params' device.
    """
    device = params[0].device if params else torch.device("cpu")
    num = torch.zeros((), dtype=torch.float64, device=device)
    den = torch.zeros((), dtype=torch.float64, device=device)
    for p, a, f, ft in zip(params, anchor, fisher_sum, fisher_theta_sum):
        if p.numel() == 0:
            continue
        a64, f64 = a.double(), f.double()
        d = p.double() - a64
        num += torch.sum(d * (ft.double() - a64 * f64))
        den += torch.sum(d * d * f64)
    return num.to(torch.float32), den.to(torch.float32)


@register("merge_", "reference")
def merge_(params: list[Tensor], anchor: list[Tensor], alpha: Scalar) -> None:
    """``theta = anchor + alpha * (theta - anchor)`` in fp32 (fp64 for fp64 operands)."""
    if all_fp32(params, anchor):
        _merge_foreach(params, anchor, alpha)
    else:
        _merge_loop(params, anchor, alpha)


def _merge_loop(params: list[Tensor], anchor: list[Tensor], alpha: Scalar) -> None:
    for p, a in zip(params, anchor):
        if p.numel() == 0:
            continue
        dt = compute_dtype(p, a)
        a32 = a.to(dt)
        p.copy_(a32 + as_compute(alpha, dt) * (p.to(dt) - a32))


def _merge_foreach(params: list[Tensor], anchor: list[Tensor], alpha: Scalar) -> None:
    moved = torch._foreach_sub(params, anchor)
    torch._foreach_mul_(moved, as_compute(alpha, torch.float32))
    torch._foreach_add_(moved, anchor)
    torch._foreach_copy_(params, moved)
