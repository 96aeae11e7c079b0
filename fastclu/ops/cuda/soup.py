"""CUDA backend: MEHL-Soup ``soup_combine_`` and ``soup_coef_grads`` (deterministic fold)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.cuda import _launch
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, stream_of
from fastclu.ops.tables import TABLES


@register("soup_combine_", "cuda")
def soup_combine_(out: list[Tensor], base: list[Tensor], diffs: list[list[Tensor]], coefs: Tensor) -> None:
    """``out = base + sum_k coefs[k, l] * diffs[k]`` in one launch (fp32 math)."""
    op = "soup_combine_"
    if not out:
        return
    require_cuda(op, "out", out)
    require_cuda(op, "base", base)
    for k, d in enumerate(diffs):
        require_cuda(op, f"diffs[{k}]", d)
    require_cuda(op, "coefs", [coefs])
    dev = out[0].device
    with on_device(dev):
        t = build_table(op, [out, base, *diffs], dev, dynamic=TABLES["soup_combine"].dynamic)
        _C.soup_combine(*t.args, len(diffs), coefs.data_ptr(), coefs.shape[1], stream_of(dev))


@register("soup_coef_grads", "cuda")
def soup_coef_grads(grads: list[Tensor], diffs: list[list[Tensor]], *, layerwise: bool) -> Tensor:
    """fp32 ``[K, L]`` (or ``[K, 1]``): fp64 per-chunk partials, folded per tensor in a fixed order."""
    op = "soup_coef_grads"
    K, L = len(diffs), len(grads)
    if L == 0:
        return torch.zeros(K, L if layerwise else 1, dtype=torch.float32)
    require_cuda(op, "grads", grads)
    for k, d in enumerate(diffs):
        require_cuda(op, f"diffs[{k}]", d)
    dev = grads[0].device
    with on_device(dev):
        t = build_table(op, [grads, *diffs], dev, dynamic=TABLES["soup_coef_grads"].dynamic)
        partial = _launch.alloc(max(t.n_chunks, 1) * K, torch.float64, dev)
        per = _launch.alloc((K, L), torch.float64, dev)
        if t.n_rows < L:  # empty tensors have no table row, so the kernel writes no entry for them
            empty = [i for i, g in enumerate(grads) if g.numel() == 0]
            per.index_fill_(1, torch.tensor(empty, device=dev), 0.0)
        _C.soup_coef_grads(*t.args, K, L, partial.data_ptr(), per.data_ptr(), stream_of(dev))
    # the layer sum is torch's fixed-order fp64 reduction of [K, L]: deterministic as well
    return (per if layerwise else per.sum(1, keepdim=True)).to(torch.float32)
