"""CUDA backend: ``fisher_accumulate_`` (one launch over every tensor)."""

from __future__ import annotations

from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, scalar, stream_of
from fastclu.ops.tables import TABLES

Scalar = float | Tensor


@register("fisher_accumulate_", "cuda")
def fisher_accumulate_(fisher: list[Tensor], grads: list[Tensor], scale: Scalar, *, power: int) -> None:
    """``fisher += scale * g**2`` (or ``|g|``) over every tensor in one launch."""
    op = "fisher_accumulate_"
    if not fisher:
        return
    require_cuda(op, "fisher", fisher)
    require_cuda(op, "grads", grads)
    dev = fisher[0].device
    with on_device(dev):
        t = build_table(op, [fisher, grads], dev, dynamic=TABLES["fisher_accumulate"].dynamic)
        s = scalar(scale, dev)
        _C.fisher_accumulate(*t.args, s.value, s.ptr, int(power), stream_of(dev))
