"""``fastclu.optim.CLASSP`` (arXiv 2405.09637): AdaGrad-style decay of adjustment with a per-weight gate.

Per weight, with ``g`` the gradient and ``acc`` the accumulated adjustment (fp32 state)::

    if g**2 > threshold:
        acc   += |g|**p
        theta -= lr * g / (acc + eps)**(1/p)          (apply_scaling=True, the paper's rule)
        theta -= lr * g                                (apply_scaling=False)

Weights whose squared gradient does not exceed ``threshold`` do not move and their ``acc``
does not grow: the updates are sparse, and a weight that has moved much is damped later. A
NaN gradient fails the gate (the weight stays as it is).

Where this differs from the public code (oswaldoludwig/CLASSP, ``CLASSP.py``):
  * the gate there is per tensor: ``(grad**2).any() > threshold`` compares a *bool* with the
    threshold, so a whole tensor moves as soon as one gradient is nonzero (for threshold < 1);
    here the gate is per weight, as the paper writes it;
  * the code accumulates ``|g|``, not ``|g|**p`` (``add_(grad.abs()) ** power`` discards the
    power); here ``acc += |g|**p``. For the default ``p = 1`` both agree.

The update is the ``"classp"`` rule of the fused :func:`fastclu.ops.combine_step_` (every
backend), so CLASSP takes role gradients, saliency masks, clipping, the anchor penalty, AMP and
the fastclu wrappers as :class:`~fastclu.optim.SGD` and :class:`~fastclu.optim.AdamW` do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastclu._scalars import check_scalar
from fastclu.optim._base import RoleOptimizer, state_dtype

__all__ = ["CLASSP"]


def _check_hparams(lr: Any, threshold: Any, eps: Any, power: Any, *, sync_ok: bool = True) -> None:
    """Every hyper-parameter finite and in range (see ``fastclu._scalars`` for device tensors)."""
    check_scalar("lr", lr, lo=0.0, sync_ok=sync_ok)
    check_scalar("threshold", threshold, lo=0.0, tensor_ok=False)
    check_scalar("eps", eps, lo=0.0, lo_open=True, tensor_ok=False)
    check_scalar("power", power, lo=0.0, lo_open=True, tensor_ok=False)


class CLASSP(RoleOptimizer):
    """CLASSP optimizer (per-weight gate, ``acc += |g|**p``; see the module docstring).

    Args:
        params: iterable of parameters or param-group dicts (fp32 / fp16 / bf16 / fp64).
        lr: learning rate (paper default 0.2; a number or a 1-element tensor).
        threshold: gate on the squared gradient, ``g**2 > threshold`` (default 0.5; 0 gates
            only exact zeros).
        eps: added to ``acc`` before the root (> 0, default 1e-5).
        power: ``p`` (> 0, default 1).
        apply_scaling: divide by ``(acc + eps)**(1/p)`` (default True, the paper's rule).
        maximize: ascend instead of descend.
        backend: the ops backend (None: automatic, see :mod:`fastclu._registry`).

    State per parameter: ``"acc"`` (fp32; fp64 for fp64 parameters, same shape) and ``"step"``
    (0-d fp32 tensor on the parameter's device), saved in ``state_dict``. The math is done in
    fp32 (fp64 for fp64). Beyond the paper: :meth:`stash`, :meth:`set_mask`,
    :meth:`set_anchor` and ``step(closure=None, *, combine=None, clip=None)`` (see
    :class:`fastclu.optim._base.RoleOptimizer`). In mask mode ``"grad"`` a masked-out weight
    sees a zero gradient, which never passes the gate; in ``"update"`` mode it and its ``acc``
    are frozen whatever the gradient.
    """

    _rule = "classp"
    _buffer_keys = ("acc",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.2,
        threshold: float = 0.5,
        eps: float = 1e-5,
        power: float = 1.0,
        *,
        apply_scaling: bool = True,
        maximize: bool = False,
        backend: str | None = None,
    ) -> None:
        _check_hparams(lr, threshold, eps, power)
        defaults = {
            "lr": lr, "threshold": float(threshold), "eps": float(eps), "power": float(power),
            "apply_scaling": bool(apply_scaling), "maximize": bool(maximize),
        }  # fmt: skip
        super().__init__(params, defaults, backend)

    def _check_group(self, group: dict[str, Any], sync_ok: bool = False) -> None:
        _check_hparams(group["lr"], group["threshold"], group["eps"], group["power"], sync_ok=sync_ok)

    def _required_group_keys(self) -> tuple[str, ...]:
        return ("lr", "threshold", "eps", "power", "apply_scaling")

    def _needs_init(self, group: dict[str, Any], st: dict[str, Any]) -> bool:
        # Fresh state (acc 0, step 0) is indistinguishable from no state: no AMP sync needed.
        return False

    def _init_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> bool:
        if "acc" not in st:
            st["acc"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.contiguous_format)
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return False

    def _state_lists(self, group: dict[str, Any], params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {k: [self.state[p][k] for p in params] for k in ("acc", "step")}

    def _rule_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "threshold": float(group["threshold"]), "power": float(group["power"]), "eps": float(group["eps"]),
            "apply_scaling": bool(group["apply_scaling"]), "maximize": bool(group["maximize"]),
        }  # fmt: skip
