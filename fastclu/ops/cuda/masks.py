"""CUDA backend: the saliency masks ``ratio_mask`` and ``topk_mask``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.bits import packed_numel
from fastclu.ops.cuda import _launch
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, scalar, stream_of
from fastclu.ops.tables import TABLES

Scalar = float | Tensor


@register("ratio_mask", "cuda")
def ratio_mask(f_forget: list[Tensor], f_remain: list[Tensor], gamma: Scalar, *, eps: float) -> list[Tensor]:
    """Bit-packed ``(F_f + eps) >= gamma * (F_r + eps)``: one thread writes one mask byte."""
    op = "ratio_mask"
    if not f_forget:
        return []
    require_cuda(op, "f_forget", f_forget)
    require_cuda(op, "f_remain", f_remain)
    dev = f_forget[0].device
    with on_device(dev):
        out = [_launch.alloc(packed_numel(f.numel()), torch.uint8, dev) for f in f_forget]
        t = build_table(op, [f_forget, f_remain, out], dev, dynamic=TABLES["ratio_mask"].dynamic)
        g = scalar(gamma, dev)
        _C.ratio_mask(*t.args, g.value, g.ptr, float(eps), stream_of(dev))
    return out


@register("topk_mask", "cuda")
def topk_mask(scores: list[Tensor], k: int) -> list[Tensor]:
    """Exact global top-k, bit-packed; ties go to the earlier element in global flat order.

    Four 8-bit histogram passes over the ordered fp32 keys, then one pass that writes the mask.
    The kernels flag NaN scores (forbidden by the contract); reading that flag is the one host
    sync of the op.
    """
    op = "topk_mask"
    if not scores:
        return []
    require_cuda(op, "scores", scores)
    dev = scores[0].device
    with on_device(dev):
        if k == 0:
            return [torch.zeros(packed_numel(s.numel()), dtype=torch.uint8, device=dev) for s in scores]
        out = [_launch.alloc(packed_numel(s.numel()), torch.uint8, dev) for s in scores]
        t = build_table(op, [scores, out], dev, dynamic=TABLES["topk_mask"].dynamic)
        if t.n_chunks == 0:
            return out
        state = _launch.alloc(4 + 256, torch.int64, dev)
        eqcount = _launch.alloc(max(t.n_chunks, 1), torch.int64, dev)
        _C.topk_mask(*t.args, int(k), state.data_ptr(), eqcount.data_ptr(), stream_of(dev))
        if int(state[3]) != 0:  # the kernels flag NaN keys; the user's tensors are untouched
            i = next(j for j, s in enumerate(scores) if s.numel() and bool(torch.isnan(s).any()))
            raise ValueError(f"scores[{i}] contains NaN (topk_mask needs totally ordered scores)")
    return out
