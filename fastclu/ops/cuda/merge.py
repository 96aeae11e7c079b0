"""CUDA backend: P&M ``merge_`` and ``merge_stats``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.cuda import _launch
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, scalar, stream_of

Scalar = float | Tensor


@register("merge_", "cuda")
def merge_(params: list[Tensor], anchor: list[Tensor], alpha: Scalar) -> None:
    """``theta = anchor + alpha * (theta - anchor)`` in one pass."""
    op = "merge_"
    if not params:
        return
    require_cuda(op, "params", params)
    require_cuda(op, "anchor", anchor)
    dev = params[0].device
    with on_device(dev):
        t = build_table(op, [params, anchor], dev)
        a = scalar(alpha, dev)
        _C.merge(*t.args, a.value, a.ptr, stream_of(dev))


@register("merge_stats", "cuda")
def merge_stats(
    params: list[Tensor], anchor: list[Tensor], fisher_sum: list[Tensor], fisher_theta_sum: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """P&M's ``(num, den)`` as two fp32 0-d tensors, summed in fp64 deterministically."""
    op = "merge_stats"
    if not params:
        z = torch.zeros((), dtype=torch.float32)
        return z, z.clone()
    lists = (("params", params), ("anchor", anchor), ("fisher_sum", fisher_sum), ("fisher_theta_sum", fisher_theta_sum))
    for name, xs in lists:
        require_cuda(op, name, xs)
    dev = params[0].device
    with on_device(dev):
        t = build_table(op, [params, anchor, fisher_sum, fisher_theta_sum], dev)
        partial = _launch.alloc(max(t.n_chunks, 1) * 2, torch.float64, dev)
        out = _launch.alloc(2, torch.float32, dev)
        _C.merge_stats(*t.args, partial.data_ptr(), out.data_ptr(), stream_of(dev))
    return out[0], out[1]
