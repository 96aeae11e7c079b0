"""CUDA backend: the elementwise multi-tensor ops (one launch each, every tensor covered)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.bits import packed_numel
from fastclu.ops.cuda import _launch
from fastclu.ops.cuda._launch import build_table, has_fp64, on_device, reference, require_cuda, scalar, stream_of

Scalar = float | Tensor


@register("fisher_accumulate_", "cuda")
def fisher_accumulate_(fisher: list[Tensor], grads: list[Tensor], scale: Scalar, *, power: int) -> None:
    """``fisher += scale * g**2`` (or ``|g|``) over every tensor in one launch."""
    op = "fisher_accumulate_"
    if not fisher:
        return
    require_cuda(op, "fisher", fisher)
    require_cuda(op, "grads", grads)
    if has_fp64(fisher, grads):
        return reference(op)(fisher, grads, scale, power=power)
    dev = fisher[0].device
    with on_device(dev):
        t = build_table(op, [fisher, grads], dev)
        s = scalar(scale, dev)
        _C.fisher_accumulate(t.ptr, t.n_rows, t.n_chunks, s.value, s.ptr, int(power), stream_of(dev))


@register("ratio_mask", "cuda")
def ratio_mask(f_forget: list[Tensor], f_remain: list[Tensor], gamma: Scalar, *, eps: float) -> list[Tensor]:
    """Bit-packed ``(F_f + eps) >= gamma * (F_r + eps)``: one thread writes one mask byte."""
    op = "ratio_mask"
    if not f_forget:
        return []
    require_cuda(op, "f_forget", f_forget)
    require_cuda(op, "f_remain", f_remain)
    if has_fp64(f_forget, f_remain):
        return reference(op)(f_forget, f_remain, gamma, eps=eps)
    dev = f_forget[0].device
    with on_device(dev):
        out = [_launch.alloc(packed_numel(f.numel()), torch.uint8, dev) for f in f_forget]
        t = build_table(op, [f_forget, f_remain, out], dev)
        g = scalar(gamma, dev)
        _C.ratio_mask(t.ptr, t.n_rows, t.n_chunks, g.value, g.ptr, float(eps), stream_of(dev))
    return out


@register("lerp_sync_", "cuda")
def lerp_sync_(slow: list[Tensor], fast: list[Tensor], beta: Scalar) -> None:
    """``slow += beta * (fast - slow); fast = slow`` in one pass."""
    op = "lerp_sync_"
    if not slow:
        return
    require_cuda(op, "slow", slow)
    require_cuda(op, "fast", fast)
    if has_fp64(slow, fast):
        return reference(op)(slow, fast, beta)
    dev = slow[0].device
    with on_device(dev):
        t = build_table(op, [slow, fast], dev)
        b = scalar(beta, dev)
        _C.lerp_sync(t.ptr, t.n_rows, t.n_chunks, b.value, b.ptr, stream_of(dev))


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
    if has_fp64(out, grads_plus, grads_minus):
        return reference(op)(out, grads_plus, grads_minus, eps, accumulate=accumulate)
    dev = out[0].device
    with on_device(dev):
        t = build_table(op, [out, grads_plus, grads_minus], dev)
        e = scalar(eps, dev)
        _C.fd_hvp(t.ptr, t.n_rows, t.n_chunks, e.value, e.ptr, bool(accumulate), stream_of(dev))


@register("merge_", "cuda")
def merge_(params: list[Tensor], anchor: list[Tensor], alpha: Scalar) -> None:
    """``theta = anchor + alpha * (theta - anchor)`` in one pass."""
    op = "merge_"
    if not params:
        return
    require_cuda(op, "params", params)
    require_cuda(op, "anchor", anchor)
    if has_fp64(params, anchor):
        return reference(op)(params, anchor, alpha)
    dev = params[0].device
    with on_device(dev):
        t = build_table(op, [params, anchor], dev)
        a = scalar(alpha, dev)
        _C.merge(t.ptr, t.n_rows, t.n_chunks, a.value, a.ptr, stream_of(dev))


@register("restore_", "cuda")
def restore_(params: list[Tensor], backup: list[Tensor]) -> None:
    """Bit-exact ``params[i] = backup[i]``: one raw-copy launch over every tensor (fp64 lists, which
    have no kernel dtype code, fall back to one async device copy per tensor)."""
    op = "restore_"
    if not params:
        return
    require_cuda(op, "params", params)
    require_cuda(op, "backup", backup)
    dev = params[0].device
    with on_device(dev):
        if not has_fp64(params, backup):
            t = build_table(op, [params, backup], dev)
            _C.restore_mt(t.ptr, t.n_rows, t.n_chunks, stream_of(dev))
            return
        _C.restore(
            [p.data_ptr() for p in params],
            [b.data_ptr() for b in backup],
            [p.numel() * p.element_size() for p in params],
            stream_of(dev),
        )
