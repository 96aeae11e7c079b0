"""SalUn: random-label fine-tuning restricted to the most forget-salient weights.

Saliency is ``|sum_b grad(-loss_forget)|`` over the forget batches; the global top
``density`` fraction of all weights form the mask (exact top-k, deterministic ties). Each
step descends cross-entropy on forget examples relabelled at random (never with their own
label) plus cross-entropy on remain examples, through the mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastclu.methods.common import MethodResult, Timer, cosine, cycle, sgd, use_backend

__all__ = ["salun", "salun_mask"]


def salun_mask(model: nn.Module, forget_loader: Iterable, density: float = 0.5):
    """Top-``density`` mask of ``|sum_b grad(-CE_forget)|`` over all trainable weights."""
    from fastclu import saliency

    params = [p for p in model.parameters() if p.requires_grad]
    dev = params[0].device
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was = model.training
    model.eval()
    try:
        for x, y in forget_loader:
            model.zero_grad(set_to_none=True)
            (-F.cross_entropy(model(x.to(dev)), y.to(dev))).backward()
            for a, p in zip(acc, params):
                if p.grad is not None:
                    a.add_(p.grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return saliency.topk_mask([a.abs() for a in acc], density)


def salun(
    model: nn.Module,
    forget_loader: Iterable,
    remain_loader: Iterable,
    *,
    steps: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    density: float = 0.5,
    mask_mode: str = "update",
    classes: int = 10,
    seed: int = 0,
    backend: str | None = None,
) -> MethodResult:
    """Unlearn with SalUn, in place.

    Args:
        steps: optimizer steps; each uses one forget batch (random labels) and one remain batch.
        lr, momentum, weight_decay: fastclu SGD; cosine learning-rate schedule over ``steps``.
        density: fraction of weights in the saliency mask (SalUn's 0.5).
        mask_mode: ``"update"`` (masked-out weights and their momentum never move, so weight
            decay cannot leak through the mask) or ``"grad"`` (the original code's gradient
            masking; weight decay and momentum still move every weight).
        classes: number of classes to draw random labels from.
        seed: seed of the random relabelling.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if mask_mode not in ("grad", "update"):
        raise ValueError(f"mask_mode must be 'grad' or 'update', got {mask_mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    with use_backend(backend), Timer(dev) as tm:
        mask = salun_mask(model, forget_loader, density)
        opt = sgd(model, lr, momentum, weight_decay)
        opt.set_mask(mask, mode=mask_mode, roles=["grad"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, steps))
        model.train()
        fit, rit = cycle(forget_loader), cycle(remain_loader)
        for _ in range(steps):
            xf, yf = next(fit)
            xr, yr = next(rit)
            # A shift in 1..classes-1 guarantees the random label differs from the true one.
            shift = torch.randint(1, classes, yf.shape, generator=g)
            yf = (yf + shift) % classes
            x = torch.cat([xf, xr]).to(dev)
            y = torch.cat([yf, yr]).to(dev)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
    return MethodResult("SalUn", tm.elapsed, steps, {"mask_density": float(mask.density())})
