"""SFR-on: online unlearning with the remain set's geometry (DESIGN §1).

One SGD optimizer, one momentum state, two kinds of steps. Every ``K``-th iteration is a
forget step: the adaptively weighted forget loss is ascended with weight ``alpha_f(t)``
(cosine-decayed), its gradient gated by the balanced forget/remain saliency mask and the
combined gradient clipped to a global norm. All other iterations descend the remain loss.
Because the remain steps share the momentum that the forget steps fed, they implicitly
correct each ascent along the remain loss's curvature ("fast-slow").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastclu.methods.common import MethodResult, Timer, adaptive_forget_loss, cosine, cycle, sgd, use_backend

__all__ = ["balanced_mask", "sfron"]


def balanced_mask(model: nn.Module, forget_loader: Iterable, remain_loader: Iterable, gamma: float = 1.0):
    """SFR-on's mask ``[F_forget >= gamma * F_remain]`` from per-batch squared-gradient Fishers.

    Returns a :class:`fastclu.saliency.SaliencyMask` aligned with the model's trainable parameters.
    """
    from fastclu import saliency

    was = model.training
    model.eval()  # a Fisher is a property of the weights: no dropout / batch-norm updates
    try:
        f_f = saliency.fisher(model, forget_loader, F.cross_entropy)
        f_r = saliency.fisher(model, remain_loader, F.cross_entropy)
    finally:
        model.train(was)
    return saliency.ratio_mask(f_f, f_r, gamma=gamma)


def sfron(
    model: nn.Module,
    forget_loader: Iterable,
    remain_loader: Iterable,
    *,
    iters: int = 1500,
    forget_every: int = 5,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    alpha_f: float = 25.0,
    clip: float | None = 7.0,
    lam: float = 0.5,
    gamma: float | None = 1.0,
    mask_mode: str = "grad",
    backend: str | None = None,
) -> MethodResult:
    """Unlearn ``forget_loader``'s examples from ``model`` (in place) with SFR-on.

    Args:
        model: the trained model; its trainable parameters are updated.
        forget_loader, remain_loader: loaders of ``(x, y)`` batches.
        iters: total iterations T (cosine schedules of lr and alpha_f run over T).
        forget_every: K; iterations ``t % K == 0`` are forget steps (the first one included).
        lr, momentum, weight_decay: the shared SGD optimizer (official defaults 0.01, 0.9, 5e-4).
        alpha_f: forget weight at t = 0, cosine-decayed to 0 at T.
        clip: global-norm bound on the masked forget update (None: no clipping).
        lam: temperature of the adaptive forget-loss weights (0: plain mean).
        gamma: balanced-mask threshold; None disables the mask.
        mask_mode: ``"grad"`` (only the forget gradient is gated; the SFR-on choice) or
            ``"update"`` (masked-out weights do not move on any step).
        backend: fastclu op backend for this run (None: automatic).

    Returns:
        MethodResult with wall time (mask computation included) and the number of steps;
        ``info`` holds the mask density and the split of forget / remain steps.
    """
    for name, v in (("iters", iters), ("forget_every", forget_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if mask_mode not in ("grad", "update"):
        raise ValueError(f"mask_mode must be 'grad' or 'update', got {mask_mode!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    dev = next(model.parameters()).device
    info: dict = {}
    with use_backend(backend), Timer(dev) as tm:
        opt = sgd(model, lr, momentum, weight_decay)
        if gamma is not None:
            mask = balanced_mask(model, forget_loader, remain_loader, gamma)
            # "grad" gates only the forget role; "update" freezes masked-out weights on every step.
            opt.set_mask(mask, mode=mask_mode, roles=["forget"])
            info["mask_density"] = float(mask.density())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, iters))
        model.train()
        fit, rit = cycle(forget_loader), cycle(remain_loader)
        n_forget = 0
        for t in range(iters):
            opt.zero_grad(set_to_none=True)
            if t % forget_every == 0:
                x, y = next(fit)
                x, y = x.to(dev), y.to(dev)
                adaptive_forget_loss(model(x), y, lam).backward()
                opt.stash("forget")
                opt.step(combine={"forget": -alpha_f * cosine(t, iters)}, clip=clip)
                n_forget += 1
            else:
                x, y = next(rit)
                x, y = x.to(dev), y.to(dev)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
    info.update(forget_steps=n_forget, remain_steps=iters - n_forget)
    return MethodResult("SFR-on", tm.elapsed, iters, info)
