"""CLASSP (arXiv 2405.09637): AdaGrad-style decay of adjustment with a per-weight gradient gate.

Per weight, with ``g`` the gradient and ``acc`` the accumulated adjustment (fp32 state)::

    if g**2 > threshold:
        acc   += |g|**p
        theta -= lr * g / (acc + eps)**(1/p)          (apply_scaling=True, the paper's rule)
        theta -= lr * g                                (apply_scaling=False)

Weights whose squared gradient does not exceed ``threshold`` do not move and their ``acc``
does not grow: the updates are sparse, and a weight that has moved much is damped later.

Where this differs from the public code (oswaldoludwig/CLASSP, ``CLASSP.py``):
  * the gate there is per tensor: ``(grad**2).any() > threshold`` compares a *bool* with the
    threshold, so a whole tensor moves as soon as one gradient is nonzero (for threshold < 1);
    here the gate is per weight, as the paper writes it;
  * the code accumulates ``|g|``, not ``|g|**p`` (``add_(grad.abs()) ** power`` discards the
    power); here ``acc += |g|**p``. For the default ``p = 1`` both agree.

Implemented in PyTorch with ``torch._foreach_*`` passes (the gate is a per-tensor comparison:
there is no foreach comparison). The fused ``combine_step_`` rule for every backend (with
masks, roles and the anchor penalty) is pending the op-layer redesign; this class is the
reference for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastclu.optim._base import SparseGradientError

__all__ = ["CLASSP"]


def _positive(name: str, v: object, *, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if v < 0 or (strict and v == 0):
        raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {v!r}")
    return float(v)


class CLASSP(Optimizer):
    """CLASSP optimizer (per-weight gate, ``acc += |g|**p``; see the module docstring).

    Args:
        params: iterable of parameters or param-group dicts (fp32 / fp16 / bf16 / fp64).
        lr: learning rate (paper default 0.2).
        threshold: gate on the squared gradient, ``g**2 > threshold`` (default 0.5; 0 gates
            only exact zeros).
        eps: added to ``acc`` before the root (> 0, default 1e-5).
        power: ``p`` (> 0, default 1).
        apply_scaling: divide by ``(acc + eps)**(1/p)`` (default True, the paper's rule).
        maximize: ascend instead of descend.

    State per parameter: ``"acc"`` (fp32; fp64 for fp64 parameters, same shape) and ``"step"``
    (0-d fp32 tensor), saved in ``state_dict``. The math is done in fp32 (fp64 for fp64).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.2,
        threshold: float = 0.5,
        eps: float = 1e-5,
        power: float = 1.0,
        *,
        apply_scaling: bool = True,
        maximize: bool = False,
    ) -> None:
        defaults = {
            "lr": _positive("lr", lr),
            "threshold": _positive("threshold", threshold),
            "eps": _positive("eps", eps, strict=True),
            "power": _positive("power", power, strict=True),
            "apply_scaling": bool(apply_scaling),
            "maximize": bool(maximize),
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, strict in (("lr", False), ("threshold", False), ("eps", True), ("power", True)):
            if key in param_group:
                _positive(f"param_group[{key!r}]", param_group[key], strict=strict)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One CLASSP update of every parameter with a gradient (no-op for missing grads)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise SparseGradientError("CLASSP does not support sparse gradients")
            if params:
                self._step_group(group, params)
        return loss

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        st = self.state[p]
        if "acc" not in st:
            dt = torch.float64 if p.dtype == torch.float64 else torch.float32
            st["acc"] = torch.zeros(p.shape, dtype=dt, device=p.device)
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return st

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        states = [self._state(p) for p in params]
        accs = [s["acc"] for s in states]
        grads = [p.grad.to(a.dtype) for p, a in zip(params, accs)]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        p_pow = float(group["power"])
        # The gate: one boolean per weight (a per-tensor comparison: no foreach compare exists).
        sq = torch._foreach_mul(grads, grads)
        gates = [(s > group["threshold"]).to(s.dtype) for s in sq]
        gated = torch._foreach_mul(grads, gates)
        if group["apply_scaling"]:
            mag = torch._foreach_abs(gated)
            if p_pow != 1.0:
                torch._foreach_pow_(mag, p_pow)
            torch._foreach_add_(accs, mag)
            denom = torch._foreach_add(accs, group["eps"])
            if p_pow != 1.0:
                torch._foreach_pow_(denom, 1.0 / p_pow)
            upd = torch._foreach_div(gated, denom)
        else:
            upd = gated
        torch._foreach_mul_(upd, -float(group["lr"]))
        low = [i for i, p in enumerate(params) if p.dtype != accs[i].dtype]
        if low:
            # fp16/bf16 weights: add in fp32, round once.
            for i in low:
                params[i].copy_(params[i].to(accs[i].dtype) + upd[i])
        same = [i for i in range(len(params)) if params[i].dtype == accs[i].dtype]
        if same:
            torch._foreach_add_([params[i] for i in same], [upd[i] for i in same])
        torch._foreach_add_([s["step"] for s in states], 1.0)
