"""Reference ``perturb_`` / ``restore_``: weight perturbation with an exact way back."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.reference._util import Scalar, as_compute, compute_dtype
from fastclu.ops.reference.philox import philox_normal


def n_rows(t: Tensor) -> int:
    """Rows of the noise scaling: dim 0 for ndim >= 2, else the whole tensor is one row."""
    return t.shape[0] if t.dim() >= 2 else 1


def row_norms_of(t: Tensor) -> Tensor:
    """fp32 L2 norm of each row (``[n_rows(t)]``): the fp32 rounding of an fp64 sum of squares."""
    rows = n_rows(t)
    if t.numel() == 0:
        return torch.zeros(rows, dtype=torch.float32, device=t.device)
    return torch.linalg.vector_norm(t.reshape(rows, -1).double(), dim=1).to(torch.float32)


def row_noise(seed: int, index: int, t: Tensor, norms: Tensor) -> Tensor:
    """fp32 noise for tensor ``index``: ``z * (norm_r / sqrt(n))``, shaped like ``t``.

    ``z`` comes from :func:`philox_normal` keyed on ``(seed, index, flat element index)``;
    ``sqrt(n)`` is rounded to fp32 once, then the per-row sigma is formed in fp32.
    """
    rows = n_rows(t)
    n = t.numel() // rows
    z = philox_normal(seed, index, t.numel(), device=t.device).reshape(rows, n)
    root_n = torch.tensor(math.sqrt(n), dtype=torch.float32, device=t.device)
    sigma = norms.reshape(rows, 1).to(device=t.device, dtype=torch.float32) / root_n
    return (z * sigma).reshape(t.shape)


@register("perturb_", "reference")
def perturb_(
    params: list[Tensor],
    scale: Scalar,
    *,
    backup: list[Tensor] | None,
    anchor: list[Tensor] | None,
    direction: list[Tensor] | None,
    seed: int | None,
    row_norms: list[Tensor] | None,
) -> list[Tensor] | None:
    """``backup = theta`` (bit for bit), then ``theta = theta + scale * d`` in fp32 (fp64 stays fp64).

    ``d`` is ``theta - anchor``, ``direction``, or the row-scaled Philox noise of
    :func:`row_noise`. In seed mode the row norms (fp32, ``[rows]`` each, from the clean
    weights unless given) are returned.
    """
    norms_out: list[Tensor] = []
    for i, p in enumerate(params):
        if backup is not None:
            backup[i].copy_(p)
        if seed is not None:
            norms = row_norms_of(p) if row_norms is None else row_norms[i].reshape(-1).to(torch.float32)
            norms_out.append(norms)
        if p.numel() == 0:
            continue
        if anchor is not None:
            dt = compute_dtype(p, anchor[i])
            p32 = p.to(dt)
            d = p32 - anchor[i].to(dt)
        elif direction is not None:
            dt = compute_dtype(p, direction[i])
            p32 = p.to(dt)
            d = direction[i].to(dt)
        else:
            dt = compute_dtype(p)
            p32 = p.to(dt)
            d = row_noise(seed, i, p, norms).to(dt)
        p.copy_(p32 + as_compute(scale, dt) * d)
    return norms_out if seed is not None else None


@register("restore_", "reference")
def restore_(params: list[Tensor], backup: list[Tensor]) -> None:
    """``params[i] = backup[i]`` bit for bit (same dtypes, checked by the op)."""
    if params:
        torch._foreach_copy_(params, backup)
