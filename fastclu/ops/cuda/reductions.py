"""CUDA backend: deterministic reductions (``gram``, ``merge_stats``) and ``topk_mask``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.bits import packed_numel
from fastclu.ops.cuda import _launch
from fastclu.ops.cuda._launch import build_table, has_fp64, on_device, reference, require_cuda, stream_of

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
    if has_fp64(*grads):
        return reference(op)(grads, mask=mask, masked=masked)
    dev = ref[0].device
    bits = sum(1 << r for r, f in enumerate(masked) if f) if mask is not None else 0
    roles: list[list[Tensor] | None] = [grads[r] if r < n_roles else None for r in range(4)]
    with on_device(dev):
        t = build_table(op, [*roles, mask if bits else None], dev)
        partial = _launch.alloc(max(t.n_chunks, 1) * _GRAM_PAIRS, torch.float64, dev)
        out = _launch.alloc((n_roles, n_roles), torch.float32, dev)
        _C.gram(t.ptr, t.n_rows, t.n_chunks, n_roles, bits, partial.data_ptr(), out.data_ptr(), stream_of(dev))
    return out


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
    if has_fp64(params, anchor, fisher_sum, fisher_theta_sum):
        return reference(op)(params, anchor, fisher_sum, fisher_theta_sum)
    dev = params[0].device
    with on_device(dev):
        t = build_table(op, [params, anchor, fisher_sum, fisher_theta_sum], dev)
        partial = _launch.alloc(max(t.n_chunks, 1) * 2, torch.float64, dev)
        out = _launch.alloc(2, torch.float32, dev)
        _C.merge_stats(t.ptr, t.n_rows, t.n_chunks, partial.data_ptr(), out.data_ptr(), stream_of(dev))
    return out[0], out[1]


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
    if has_fp64(scores):
        return reference(op)(scores, k)
    dev = scores[0].device
    with on_device(dev):
        if k == 0:
            return [torch.zeros(packed_numel(s.numel()), dtype=torch.uint8, device=dev) for s in scores]
        out = [_launch.alloc(packed_numel(s.numel()), torch.uint8, dev) for s in scores]
        t = build_table(op, [scores, out], dev)
        if t.n_chunks == 0:
            return out
        state = _launch.alloc(4 + 256, torch.int64, dev)
        eqcount = _launch.alloc(max(t.n_chunks, 1), torch.int64, dev)
        _C.topk_mask(t.ptr, t.n_rows, t.n_chunks, int(k), state.data_ptr(), eqcount.data_ptr(), stream_of(dev))
        if int(state[3]) != 0:  # the kernels flag NaN keys; the user's tensors are untouched
            i = next(j for j, s in enumerate(scores) if s.numel() and bool(torch.isnan(s).any()))
            raise ValueError(f"scores[{i}] contains NaN (topk_mask needs totally ordered scores)")
    return out
