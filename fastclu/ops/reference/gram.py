"""Reference ``gram``: inner products of the (masked) role gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.reference._util import mask_bools


@register("gram", "reference")
def gram(grads: list[list[Tensor]], *, mask: list[Tensor] | None, masked: list[bool]) -> Tensor:
    """``G[r, s] = sum_i <m_r g_r[i], m_s g_s[i]>``, returned as fp32 ``[R, R]``.

    Each tensor's partial ``<a, b>`` is ``(a * b).sum()`` in fp32 (fp64 when a gradient is fp64):
    torch's CPU sum is a cascade (pairwise-blocked) summation, so a partial of ``n`` terms is
    within about ``(2 + log2 n) * 2**-24 * sum |a_j b_j|`` of the exact value; the partials are
    then summed in fp64, so the result is within that bound (with ``n`` the largest tensor) of
    the fp64 formula, plus the final fp32 rounding. Masked-out elements are dropped
    (``where(m, g, 0)``) before any product, so an inf/NaN gradient under a zero mask bit does
    not leak into the result. The order of every sum is fixed (tensor by tensor, pair by pair),
    so the result is deterministic. Only the upper triangle is computed; the lower one is its
    mirror, so the result is exactly symmetric.
    """
    n_roles = len(grads)
    ref = grads[0]
    device = ref[0].device if ref else torch.device("cpu")
    if not ref:
        return torch.zeros(n_roles, n_roles, dtype=torch.float32, device=device)
    dtype = torch.float64 if any(g.dtype == torch.float64 for role in grads for g in role) else torch.float32
    keep = mask_bools(mask, [g.shape for g in ref]) if mask is not None and any(masked) else None
    zero = torch.zeros((), dtype=dtype, device=device)
    rows = []
    for r, role in enumerate(grads):
        row = [g if g.dtype == dtype else g.to(dtype) for g in role]
        if keep is not None and masked[r]:
            row = [torch.where(k, g, zero) for k, g in zip(keep, row)]
        rows.append(row)
    pairs = [(r, s) for r in range(n_roles) for s in range(r, n_roles)]
    # partials[i, k]: tensor i's inner product for pair k (fp32), summed over i in fp64 below.
    partials = torch.stack(
        [torch.stack([torch.mul(rows[r][i], rows[s][i]).sum() for r, s in pairs]) for i in range(len(ref))]
    )
    upper = partials.to(torch.float64).sum(0).to(torch.float32)
    where = [pairs.index((min(r, s), max(r, s))) for r in range(n_roles) for s in range(n_roles)]
    return upper[torch.tensor(where, device=device)].reshape(n_roles, n_roles)
