"""Perturb-and-Merge (P&M) coefficient and merge, over the multi-tensor ops.

After training task ``t`` to ``theta_t``, P&M merges it with the previous merged model
``theta_prev``: ``theta = theta_prev + alpha * (theta_t - theta_prev)``. With diagonal Fishers
``F_i`` and task optima ``theta_i`` of every task so far (the current one included) kept as
the running sums ``S_F = sum_i F_i`` and ``S_Ftheta = sum_i F_i * theta_i``, the ``alpha`` that
minimises the quadratic model ``sum_i sum_j F_i[j] (theta[j] - theta_i[j])**2`` along the
segment is, with ``delta = theta_t - theta_prev``::

    alpha = sum delta * (S_Ftheta - theta_prev * S_F) / sum delta**2 * S_F,   clamped to [0, 1]

All functions take lists aligned with the parameter list; tensors may sit on several devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastclu import distributed, ops
from fastclu.perturb import by_device

__all__ = ["accumulate_task_", "merge_coefficient", "merge_sums", "merge_task_"]


def _pick(xs: Sequence[Tensor], idx: list[int]) -> list[Tensor]:
    return [xs[i] for i in idx]


def merge_sums(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor],
    fisher_sum: Sequence[Tensor],
    fisher_theta_sum: Sequence[Tensor],
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(num, den)`` of the P&M coefficient (:func:`fastclu.ops.merge_stats`), summed over devices.

    Returns two fp32 0-d tensors on the first parameter's device (CPU when there is none).
    """
    params, anchor = list(params), list(anchor)
    fisher_sum, fisher_theta_sum = list(fisher_sum), list(fisher_theta_sum)
    if distributed.any_dtensor(params):  # FSDP2: shard partials, all-reduced
        return distributed.merge_sums(params, anchor, fisher_sum, fisher_theta_sum, backend=backend)
    groups = by_device(params)
    if len(groups) <= 1:
        with torch.no_grad():
            return ops.merge_stats(params, anchor, fisher_sum, fisher_theta_sum, backend=backend)
    dev = params[0].device
    num = torch.zeros((), dtype=torch.float32, device=dev)
    den = torch.zeros((), dtype=torch.float32, device=dev)
    for idx in groups.values():
        with torch.no_grad():
            n, d = ops.merge_stats(
                _pick(params, idx), _pick(anchor, idx), _pick(fisher_sum, idx), _pick(fisher_theta_sum, idx),
                backend=backend,
            )  # fmt: skip
        num, den = num + n.to(dev), den + d.to(dev)
    return num, den


def merge_coefficient(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor],
    fisher_sum: Sequence[Tensor],
    fisher_theta_sum: Sequence[Tensor],
    *,
    backend: str | None = None,
) -> Tensor:
    """The P&M ``alpha = clamp(num / den, 0, 1)`` as an fp32 0-d tensor (no host sync).

    ``den == 0`` (the task vector is zero, or no Fisher mass lies along it) leaves the
    quadratic model flat along the segment; ``alpha`` is then 1, i.e. the trained weights are
    kept as they are.
    """
    num, den = merge_sums(params, anchor, fisher_sum, fisher_theta_sum, backend=backend)
    return _alpha(num, den)


def _alpha(num: Tensor, den: Tensor) -> Tensor:
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, (num / safe).clamp(0.0, 1.0), torch.ones_like(num))


def merge_task_(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor],
    fisher_sum: Sequence[Tensor],
    fisher_theta_sum: Sequence[Tensor],
    *,
    backend: str | None = None,
    label: str = "merge_task_",
) -> Tensor:
    """In place: ``theta = anchor + alpha * (theta - anchor)`` with :func:`merge_coefficient`'s alpha.

    ``fisher_sum``/``fisher_theta_sum`` must already include the current task (see
    :func:`accumulate_task_`). Returns alpha (fp32 0-d tensor).

    A non-finite ``num`` or ``den`` of alpha (a NaN/inf in the weights, the anchor or the sums) raises ``ValueError``
    starting with ``label`` before any weight moves (one host sync per merge).
    """
    params, anchor = list(params), list(anchor)
    num, den = merge_sums(params, anchor, fisher_sum, fisher_theta_sum, backend=backend)
    if not bool(torch.isfinite(num) & torch.isfinite(den)):
        raise ValueError(
            f"{label}: the merge coefficient is not finite (num={float(num)}, den={float(den)}): the weights, "
            "the anchor or the Fisher sums hold NaN/inf; nothing was merged"
        )
    alpha = _alpha(num, den)
    with torch.no_grad():
        for idx in by_device(params).values():
            a = alpha.to(params[idx[0]].device)
            ops.merge_(distributed.local_list(_pick(params, idx)), distributed.local_list(_pick(anchor, idx)), a,
                       backend=backend)  # fmt: skip
    return alpha


def accumulate_task_(
    fisher_sum: Sequence[Tensor],
    fisher_theta_sum: Sequence[Tensor],
    fisher: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    scale: float | Tensor = 1.0,
) -> None:
    """In place, once per task: ``S_F += scale * F`` and ``S_Ftheta += scale * F * theta`` (fp32 sums).

    ``fisher`` is the task's accumulated diagonal Fisher and ``scale`` typically
    ``1 / number_of_batches`` so that every task enters with its mean Fisher (a 0-d tensor
    ``scale`` is moved to each sum's device); ``params`` are
    the task's trained weights (any float dtype, read in fp32). Runs once per task, not per
    step, so plain tensor ops suffice here.
    """
    with torch.no_grad():
        for sf, sft, f, p in zip(fisher_sum, fisher_theta_sum, fisher, params):
            s = scale.to(device=sf.device, dtype=sf.dtype) if isinstance(scale, Tensor) else scale
            fs = f.to(sf.dtype) * s
            sf.add_(fs)
            sft.addcmul_(fs, p.to(sft.dtype))
