"""``fastclu.optim.AdamW``: drop-in for ``torch.optim.AdamW`` with role gradients, masks, clipping, penalty."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastclu._scalars import check_scalar
from fastclu.optim._base import RoleOptimizer, state_dtype


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any, *, sync_ok: bool = True) -> None:
    """Every hyper-parameter finite and in range, before anything is created (see ``fastclu._scalars``:
    accelerator tensors are read only where ``sync_ok``, i.e. where the value is set, not per step)."""
    check_scalar("lr", lr, lo=0.0, invalid="Invalid learning rate", sync_ok=sync_ok)
    check_scalar("eps", eps, lo=0.0, invalid="Invalid epsilon value", sync_ok=sync_ok)
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    for i, b in enumerate(betas):
        check_scalar(f"betas[{i}]", b, lo=0.0, hi=1.0, hi_open=True, sync_ok=sync_ok,
                     invalid=f"Invalid beta parameter at index {i}")  # fmt: skip
    check_scalar("weight_decay", weight_decay, lo=0.0, invalid="Invalid weight_decay value", sync_ok=sync_ok)


def _check_torch_compat(lr: Any, betas: Any, foreach: Any, capturable: Any) -> None:
    """torch.optim.AdamW's refusals of tensor hyper-parameters, kept for drop-in parity."""
    if isinstance(lr, Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        if isinstance(betas[0], Tensor) and foreach and not capturable:
            raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True")


class AdamW(RoleOptimizer):
    """AdamW (decoupled weight decay), numerically identical to ``torch.optim.AdamW`` (single-tensor path).

    Same arguments, defaults and state_dict layout (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) as torch's AdamW; a state dict saved by either loads into the other.
    State is kept in fp32 (fp64 for fp64 parameters) even for fp16/bf16 parameters, whose update
    is computed in fp32 and written back; ``step`` is a 0-d fp32 tensor on the parameter's device.
    Tensor betas are converted to floats. Complex parameters step as real views, as torch's do
    (complex moments, torch's layout; masks in the complex shape: see :mod:`fastclu.optim._complex`).

    Beyond torch: :meth:`stash`, :meth:`set_mask`, :meth:`set_anchor` and
    ``step(closure=None, *, combine=None, clip=None)`` (see :class:`fastclu.optim._base.RoleOptimizer`).
    In mask mode ``"update"`` the per-tensor ``step`` counter still advances (bias corrections are
    per tensor) while masked-out moments stay frozen. ``foreach``, ``capturable`` and ``fused`` are
    accepted for compatibility and ignored; ``differentiable=True`` is not supported.
    """

    _rule = "adamw"
    _buffer_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
    ) -> None:
        _check_torch_compat(lr, betas, foreach, capturable)
        _check_hparams(lr, betas, eps, weight_decay)
        betas = tuple(float(b) for b in betas)
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastclu.optim.AdamW")
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
            "maximize": maximize, "foreach": foreach, "capturable": capturable, "differentiable": differentiable,
            "fused": fused, "decoupled_weight_decay": True,
        }  # fmt: skip
        super().__init__(params, defaults, backend)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group["decoupled_weight_decay"] = True
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=p.device)

    def _check_group(self, group: dict[str, Any], sync_ok: bool = False) -> None:
        _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"], sync_ok=sync_ok)

    def _needs_init(self, group: dict[str, Any], st: dict[str, Any]) -> bool:
        # Fresh AdamW state (zeros, step 0) is indistinguishable from no state: no AMP sync needed.
        return False

    def _init_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> bool:
        dt = state_dtype(p)
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.contiguous_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.contiguous_format)
        return False

    def _state_flags(self, group: dict[str, Any]) -> tuple:
        return (bool(group["amsgrad"]),)

    def _state_lists(self, group: dict[str, Any], params: list[Tensor]) -> dict[str, list[Tensor]]:
        keys = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        return {k: [self.state[p][k] for p in params] for k in keys}

    def _rule_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        b1, b2 = group["betas"]
        return {
            "weight_decay": float(group["weight_decay"]), "maximize": bool(group["maximize"]),
            "betas": (float(b1), float(b2)), "eps": float(group["eps"]), "amsgrad": bool(group["amsgrad"]),
        }  # fmt: skip
