"""``fastclu.optim.SGD``: drop-in for ``torch.optim.SGD`` with role gradients, masks, clipping, penalty."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastclu._scalars import check_scalar
from fastclu.optim._base import RoleOptimizer, state_dtype


def _check_hparams(
    lr: Any, momentum: Any, dampening: Any, weight_decay: Any, nesterov: Any, *, sync_ok: bool = True
) -> None:
    """Every hyper-parameter finite and in range, before anything is created (see ``fastclu._scalars``:
    accelerator tensors are read only where ``sync_ok``, i.e. where the value is set, not per step)."""
    check_scalar("lr", lr, lo=0.0, invalid="Invalid learning rate", sync_ok=sync_ok)
    momentum = check_scalar("momentum", momentum, lo=0.0, invalid="Invalid momentum value", sync_ok=sync_ok)
    dampening = check_scalar("dampening", dampening, lo=0.0, invalid="Invalid dampening value", sync_ok=sync_ok)
    check_scalar("weight_decay", weight_decay, lo=0.0, invalid="Invalid weight_decay value", sync_ok=sync_ok)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    if nesterov and not (isinstance(momentum, float) and isinstance(dampening, float)):
        raise TypeError("nesterov=True needs momentum and dampening as numbers")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class SGD(RoleOptimizer):
    """Stochastic gradient descent, numerically identical to ``torch.optim.SGD`` (single-tensor path).

    Same arguments, defaults and state_dict layout (``momentum_buffer``) as torch's SGD; a state
    dict saved by either loads into the other. Momentum buffers are kept in fp32 (fp64 for fp64
    parameters) even for fp16/bf16 parameters, whose update is computed in fp32 and written back.
    Complex parameters step as real views, as torch's do (complex state, torch's layout; masks in
    the complex shape: see :mod:`fastclu.optim._complex`).

    Beyond torch: :meth:`stash`, :meth:`set_mask`, :meth:`set_anchor` and
    ``step(closure=None, *, combine=None, clip=None)`` (see :class:`fastclu.optim._base.RoleOptimizer`).
    ``foreach`` and ``fused`` are accepted for compatibility and ignored (the update is always one
    fused op per parameter group and device/dtype); ``differentiable=True`` is not supported.
    ``backend`` selects the ops backend (None: automatic, see :mod:`fastclu._registry`).
    """

    _rule = "sgd"
    _buffer_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
    ) -> None:
        _check_hparams(lr, momentum, dampening, weight_decay, nesterov)
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastclu.optim.SGD")
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
            "nesterov": nesterov, "maximize": maximize, "foreach": foreach, "differentiable": differentiable,
            "fused": fused,
        }  # fmt: skip
        super().__init__(params, defaults, backend)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _check_group(self, group: dict[str, Any], sync_ok: bool = False) -> None:
        _check_hparams(group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
                       sync_ok=sync_ok)  # fmt: skip

    def _needs_init(self, group: dict[str, Any], st: dict[str, Any]) -> bool:
        return group["momentum"] != 0 and st.get("momentum_buffer") is None

    def _init_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> bool:
        if not self._needs_init(group, st):
            return False
        # torch copies the first d_p into the buffer; the fused op does that (init_momentum=True).
        st["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.contiguous_format)
        return True

    def _state_flags(self, group: dict[str, Any]) -> tuple:
        return (group["momentum"] != 0,)

    def _state_lists(self, group: dict[str, Any], params: list[Tensor]) -> dict[str, list[Tensor]]:
        if group["momentum"] == 0:
            return {}
        return {"momentum_buffer": [self.state[p]["momentum_buffer"] for p in params]}

    def _rule_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "weight_decay": float(group["weight_decay"]), "maximize": bool(group["maximize"]),
            "momentum": float(group["momentum"]), "dampening": float(group["dampening"]),
            "nesterov": bool(group["nesterov"]),
        }  # fmt: skip
