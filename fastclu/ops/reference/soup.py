"""Reference MEHL-Soup ops: ``soup_combine_`` (the weighted combination) and ``soup_coef_grads``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register


@register("soup_combine_", "reference")
def soup_combine_(out: list[Tensor], base: list[Tensor], diffs: list[list[Tensor]], coefs: Tensor) -> None:
    """``out[i] = base[i] + sum_k coefs[k, l(i)] * diffs[k][i]``, ``k`` in increasing order.

    fp32 math (fp64 when a tensor of position ``i`` is fp64), rounded once into ``out``'s dtype.
    An fp32 / fp64 ``out`` is the accumulator itself: no tensor-sized temporary (the soup streams
    ingredients to keep memory low).
    """
    c = coefs.detach().cpu().tolist()  # host floats: one transfer, not one per (k, tensor)
    for i, o in enumerate(out):
        if o.numel() == 0:
            continue
        ts = [base[i], *(d[i] for d in diffs)]
        dt = torch.float64 if any(t.dtype == torch.float64 for t in (o, *ts)) else torch.float32
        col = i if len(c[0]) > 1 else 0
        acc = o if o.dtype == dt else torch.empty(o.shape, dtype=dt, device=o.device)
        acc.copy_(base[i])  # a no-op copy when out is base
        for k, d in enumerate(diffs):
            acc.add_(d[i], alpha=c[k][col])  # mixed dtypes: computed in acc's dtype
        if acc is not o:
            o.copy_(acc)


_DOT_CHUNK = 1 << 18  # fp64 temporaries of 2 MB, not of the tensor's size


def _dot64(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() <= _DOT_CHUNK:
        return torch.dot(a.double(), b.double())
    acc = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, a.numel(), _DOT_CHUNK):
        acc += torch.dot(a[s : s + _DOT_CHUNK].double(), b[s : s + _DOT_CHUNK].double())
    return acc


@register("soup_coef_grads", "reference")
def soup_coef_grads(grads: list[Tensor], diffs: list[list[Tensor]], *, layerwise: bool) -> Tensor:
    """``G[k, i] = <grads[i], diffs[k][i]>`` summed in fp64; ``[K, L]`` or ``[K, 1]`` (sum over ``i``).

    Returns fp32, or fp64 when any input is fp64 (the caller's precision is kept).
    """
    K, L = len(diffs), len(grads)
    device = grads[0].device if grads else torch.device("cpu")
    fp64 = any(g.dtype == torch.float64 for g in grads) or any(t.dtype == torch.float64 for d in diffs for t in d)
    if L == 0:
        acc = torch.zeros(K, 0, dtype=torch.float64, device=device)
    else:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        acc = torch.stack([torch.stack([_dot64(g, d[i]) if g.numel() else zero for i, g in enumerate(grads)])
                           for d in diffs])  # fmt: skip
    if not layerwise:
        acc = acc.sum(1, keepdim=True)
    return acc if fp64 else acc.to(torch.float32)
