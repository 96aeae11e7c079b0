"""Reference ``lerp_sync_``: fast-slow (Lookahead) synchronisation."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.reference._util import Scalar, all_fp32, as_compute, compute_dtype


@register("lerp_sync_", "reference")
def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: Scalar) -> None:
    """``slow = slow + beta * (fast - slow)`` in fp32 (fp64 if either is fp64), then ``fast = slow``.

    ``fast`` receives the stored (rounded) new ``slow``, so after the call both hold the same
    value up to ``fast``'s own dtype. The explicit form (not ``torch.lerp``, which switches
    formula at ``beta >= 0.5``) is the one every backend follows.
    """
    if all_fp32(slow, fast):
        _foreach(slow, fast, beta)
    else:
        _loop(slow, fast, beta)


def _loop(slow: list[Tensor], fast: list[Tensor], beta: Scalar) -> None:
    for s, f in zip(slow, fast):
        if s.numel() == 0:
            continue
        dt = compute_dtype(s, f)
        s32 = s.to(dt)
        new = s32 + as_compute(beta, dt) * (f.to(dt) - s32)
        s.copy_(new)
        f.copy_(s)


def _foreach(slow: list[Tensor], fast: list[Tensor], beta: Scalar) -> None:
    step = torch._foreach_sub(fast, slow)
    torch._foreach_mul_(step, as_compute(beta, torch.float32))
    torch._foreach_add_(slow, step)
    torch._foreach_copy_(fast, slow)
