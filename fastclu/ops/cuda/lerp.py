"""CUDA backend: ``lerp_sync_`` (one launch over every tensor)."""

from __future__ import annotations

from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, scalar, stream_of

Scalar = float | Tensor


@register("lerp_sync_", "cuda")
def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: Scalar) -> None:
    """``slow += beta * (fast - slow); fast = slow`` in one pass."""
    op = "lerp_sync_"
    if not slow:
        return
    require_cuda(op, "slow", slow)
    require_cuda(op, "fast", fast)
    dev = slow[0].device
    with on_device(dev):
        t = build_table(op, [slow, fast], dev)
        b = scalar(beta, dev)
        _C.lerp_sync(*t.args, b.value, b.ptr, stream_of(dev))
