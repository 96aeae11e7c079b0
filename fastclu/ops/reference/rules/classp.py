"""CLASSP (arXiv 2405.09637), per weight, as :class:`fastclu.optim.CLASSP` documents it.

Where ``g * g > threshold``: ``acc += |g|**p`` and ``theta -= lr * g / (acc + eps)**(1/p)``
(``apply_scaling``; else ``theta -= lr * g``); elsewhere neither the weight nor ``acc`` moves
(a selection: a NaN gradient fails the gate and moves nothing). ``p == 2`` uses a square and a
square root (what torch's pow does for these exponents), ``p == 1`` no power at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu.ops.rules import StepConfig


def _pow(x: Tensor, p: float) -> Tensor:
    if p == 1.0:
        return x
    return x * x if p == 2.0 else x.pow(p)


def _root(x: Tensor, p: float) -> Tensor:
    if p == 1.0:
        return x
    return x.sqrt() if p == 2.0 else x.pow(1.0 / p)


def _step(theta: Tensor, g: Tensor, acc: Tensor, cfg: StepConfig) -> tuple[Tensor, Tensor | None]:
    """The new weights and ``acc`` (None without scaling), out of place."""
    on = g * g > cfg.threshold
    upd = g
    new_acc = None
    if cfg.apply_scaling:
        new_acc = torch.where(on, acc + _pow(g.abs(), cfg.power), acc)
        upd = g / _root(new_acc + cfg.eps, cfg.power)
    return torch.where(on, theta + upd * -cfg.lr, theta), new_acc


def update(theta: Tensor, g: Tensor, bufs: dict[str, Tensor], step: Tensor | None, cfg: StepConfig) -> None:
    """In place on ``theta``, ``bufs["acc"]`` and the 0-d ``step`` counter."""
    assert step is not None
    step += 1
    new_theta, new_acc = _step(theta, g, bufs["acc"], cfg)
    theta.copy_(new_theta)
    if new_acc is not None:
        bufs["acc"].copy_(new_acc)


def update_foreach(
    thetas: list[Tensor],
    gs: list[Tensor],
    bufs: dict[str, list[Tensor]],
    steps: list[Tensor] | None,
    cfg: StepConfig,
) -> None:
    """:func:`update` over lists (in place): the gate and the selections need a per-tensor
    ``where`` (no foreach comparison exists); the powers and sums are foreach passes."""
    assert steps is not None
    torch._foreach_add_(steps, 1.0)
    if not thetas:
        return
    ons = [g * g > cfg.threshold for g in gs]
    upds = gs
    if cfg.apply_scaling:
        accs = bufs["acc"]
        mags = torch._foreach_abs(gs)
        if cfg.power == 2.0:
            mags = torch._foreach_mul(mags, mags)
        elif cfg.power != 1.0:
            torch._foreach_pow_(mags, cfg.power)
        grown = torch._foreach_add(accs, mags)
        for a, on, new in zip(accs, ons, grown):
            a.copy_(torch.where(on, new, a))
        den = torch._foreach_add(accs, cfg.eps)
        if cfg.power == 2.0:
            torch._foreach_sqrt_(den)
        elif cfg.power != 1.0:
            torch._foreach_pow_(den, 1.0 / cfg.power)
        upds = torch._foreach_div(gs, den)
    moved = torch._foreach_mul(upds, -cfg.lr) if not isinstance(cfg.lr, Tensor) else [u * -cfg.lr for u in upds]
    torch._foreach_add_(moved, thetas)
    for t, on, new in zip(thetas, ons, moved):
        t.copy_(torch.where(on, new, t))
