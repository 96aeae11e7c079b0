"""CUDA backend: ``gram`` (fp64 per-chunk partials, then a fixed-order fold: deterministic)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.cuda import _launch
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, stream_of
from fastclu.ops.tables import TABLES

Scalar = float | Tensor


_GRAM_PAIRS = 10  # partial sums per chunk: the r <= s pairs of 4 roles


@register("gram", "cuda")
def gram(grads: list[list[Tensor]], *, mask: list[Tensor] | None, masked: list[bool]) -> Tensor:
    """fp32 ``[R, R]`` Gram matrix: fp64 per-chunk partials, then a fixed-order fold (no atomics)."""
    op = "gram"
    n_roles = len(grads)
    ref = grads[0]
    if not ref:
        return torch.zeros(n_roles, n_roles, dtype=torch.float32)
    for r, g in enumerate(grads):
        require_cuda(op, f"grads[{r}]", g)
    if mask is not None:
        require_cuda(op, "mask", mask)
    dev = ref[0].device
    bits = sum(1 << r for r, f in enumerate(masked) if f) if mask is not None else 0
    roles: list[list[Tensor] | None] = [grads[r] if r < n_roles else None for r in range(4)]
    with on_device(dev):
        t = build_table(op, [*roles, mask if bits else None], dev, dynamic=TABLES["gram"].dynamic)
        partial = _launch.alloc(max(t.n_chunks, 1) * _GRAM_PAIRS, torch.float64, dev)
        out = _launch.alloc((n_roles, n_roles), torch.float32, dev)
        _C.gram(*t.args, n_roles, bits, partial.data_ptr(), out.data_ptr(), stream_of(dev))
    return out
