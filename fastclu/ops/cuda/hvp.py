"""CUDA backend: ``fd_hvp_`` (one launch over every tensor)."""

from __future__ import annotations

from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, scalar, stream_of
from fastclu.ops.tables import TABLES

Scalar = float | Tensor


@register("fd_hvp_", "cuda")
def fd_hvp_(
    out: list[Tensor], grads_plus: list[Tensor], grads_minus: list[Tensor], eps: Scalar, *, accumulate: bool
) -> None:
    """``out (+)= (g_plus - g_minus) / (2 eps)``; without ``accumulate`` ``out`` is never read."""
    op = "fd_hvp_"
    if not out:
        return
    for name, xs in (("out", out), ("grads_plus", grads_plus), ("grads_minus", grads_minus)):
        require_cuda(op, name, xs)
    dev = out[0].device
    with on_device(dev):
        t = build_table(op, [out, grads_plus, grads_minus], dev, dynamic=TABLES["fd_hvp"].dynamic)
        e = scalar(eps, dev)
        _C.fd_hvp(*t.args, e.value, e.ptr, bool(accumulate), stream_of(dev))
