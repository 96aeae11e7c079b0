"""Reference ``gram``: inner products of the (masked) role gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.bits import unpack_bits


@register("gram", "reference")
def gram(grads: list[list[Tensor]], *, mask: list[Tensor] | None, masked: list[bool]) -> Tensor:
    """``G[r, s] = sum_i <m_r g_r[i], m_s g_s[i]>``, accumulated in fp64, returned as fp32 ``[R, R]``.

    Masked-out elements are dropped (``where(m, g, 0)``), so an inf/NaN gradient under a zero mask
    bit does not leak into the result. Sums run in a fixed order (tensor by tensor), so the result
    is deterministic.
    """
    n_roles = len(grads)
    ref = grads[0]
    device = ref[0].device if ref else torch.device("cpu")
    acc = torch.zeros(n_roles, n_roles, dtype=torch.float64, device=device)
    for i in range(len(ref)):
        n = ref[i].numel()
        if n == 0:
            continue
        keep = unpack_bits(mask[i], n) if mask is not None else None
        rows = []
        for r in range(n_roles):
            g = grads[r][i].reshape(-1).to(torch.float64)
            if masked[r]:
                g = torch.where(keep, g, torch.zeros((), dtype=torch.float64, device=device))
            rows.append(g)
        v = torch.stack(rows)
        acc += v @ v.T
    # v @ v.T is symmetric in exact arithmetic but not always bit for bit; kernels fill one triangle.
    acc = torch.triu(acc) + torch.triu(acc, diagonal=1).T
    return acc.to(torch.float32)
