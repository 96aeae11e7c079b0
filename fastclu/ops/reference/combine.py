"""Reference ``combine_step_``: masked role-gradient combination fused with an update rule.

This file is the shared prologue (mask, role weights, scale, AMP unscale, penalty, fused
restore, update-mode selection); each rule's update lives in ``reference/rules/<rule>.py``.
The update mirrors the op order of torch.optim's single-tensor SGD / AdamW (``foreach=False``)
so that one role with coefficient 1, scale 1, no mask / penalty / AMP and fp32 parameters is
bit-identical to torch. Arguments arrive validated by :func:`fastclu.ops.combine_step_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastclu._registry import register
from fastclu.ops.bits import unpack_bits
from fastclu.ops.reference.rules import update_of
from fastclu.ops.rules import StepConfig

Scalar = float | Tensor


def _is(x: Scalar, value: float) -> bool:
    # Only Python floats are known on the host; a tensor scalar is always applied (no sync).
    return isinstance(x, float) and x == value


def _compute_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _work(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The tensor itself when it already has the compute dtype (in-place math), else a copy."""
    return t if t.dtype == dtype else t.to(dtype)


def _combined_grad(
    i: int,
    grads: Sequence[list[Tensor]],
    coeffs: Sequence[Scalar],
    scale: Scalar,
    bits: Tensor | None,
    gate: Sequence[bool],
    dtype: torch.dtype,
) -> Tensor:
    # Never modifies an input gradient: every op below is out of place.
    g: Tensor | None = None
    for r, role in enumerate(grads):
        x = _work(role[i], dtype)
        if bits is not None and gate[r]:
            # Selection, not multiplication: a gated-out element contributes exactly +0,
            # even when the role gradient holds inf/NaN there.
            x = torch.where(bits, x, torch.zeros((), dtype=dtype, device=x.device))
        if not _is(coeffs[r], 1.0):
            x = x * coeffs[r]
        # Start from the first term (0 + x would turn -0.0 into +0.0 and break bit parity).
        g = x if g is None else g + x
    assert g is not None
    if not _is(scale, 1.0):
        g = g * scale
    return g


@register("combine_step_", "reference")
def combine_step_(
    params: list[Tensor],
    grads: Sequence[list[Tensor]],
    state: dict[str, list[Tensor]],
    *,
    rule: str,
    lr: Scalar,
    coeffs: Sequence[Scalar],
    scale: Scalar,
    mask: list[Tensor] | None,
    masked: Sequence[bool],
    mask_mode: str,
    penalty: Scalar,
    importance: list[Tensor] | None,
    anchor: list[Tensor] | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    restore_from: list[Tensor] | None,
    maximize: bool,
    **hparams: object,
) -> None:
    """See :func:`fastclu.ops.combine_step_` (the contract); this is its specification in PyTorch."""
    if restore_from is not None:
        # The restore is not part of the step: it happens even when AMP skips the update,
        # otherwise a skipped step would leave the weights perturbed.
        for p, src in zip(params, restore_from):
            p.copy_(src)
    if found_inf is not None and float(found_inf.reshape(())) != 0.0:
        return
    gs = None if grad_scale is None else grad_scale.reshape(())
    gate = [bool(f) and mask_mode == "grad" for f in masked]
    cfg = StepConfig(rule, lr, maximize, **hparams)  # type: ignore[arg-type]
    update = update_of(rule)
    state_keys = [k for k in cfg.state_keys if k != "step"]
    for i, p in enumerate(params):
        dtype = _compute_dtype(p)
        bits = unpack_bits(mask[i], p.numel(), p.shape) if mask is not None else None
        theta = _work(p, dtype)
        bufs = {k: _work(state[k][i], dtype) for k in state_keys}
        if mask_mode == "update":
            old_theta = theta.clone()
            old_bufs = {k: b.clone() for k, b in bufs.items()}

        g = _combined_grad(i, grads, coeffs, scale, bits, gate, dtype)
        if gs is not None:
            g = g / gs
        if importance is not None and not _is(penalty, 0.0):
            g = g + penalty * _work(importance[i], dtype) * (theta - _work(anchor[i], dtype))
        if maximize:
            g = -g

        update(theta, g, bufs, state["step"][i] if cfg.counts_steps else None, cfg)

        if mask_mode == "update":
            # Masked-out weights and their optimizer state do not move at all.
            theta.copy_(torch.where(bits, theta, old_theta))
            for k, b in bufs.items():
                b.copy_(torch.where(bits, b, old_bufs[k]))
        if theta is not p:
            p.copy_(theta)
        for k, b in bufs.items():
            if b is not state[k][i]:
                state[k][i].copy_(b)
