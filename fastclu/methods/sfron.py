"""SFR-on: online unlearning with the remain set's geometry (DESIGN §1).

One optimizer, one momentum state, two kinds of steps. A forget step ascends the adaptively
weighted forget loss with weight ``alpha_f(t)`` (cosine-decayed), its gradient clipped to a
global norm and gated by the balanced forget/remain saliency mask; a remain step descends
the remain loss. Because the remain steps share the momentum that the forget steps fed, they
implicitly correct each ascent along the remain loss's curvature ("fast-slow").

Loops (``loop=``):

* ``"official"`` (default; K1nght/Unified-Unlearning-w-Remain-Geometry,
  ``Classification/unlearn/sfron.py``): a remain step on every iteration; on every ``K``-th
  iteration a forget step comes first. ``T`` iterations make ``T + ceil(T / K)`` optimizer
  steps. As in that code the clip bounds the norm of the whole scaled forget gradient
  ``alpha_f(t) * grad`` (``clip_grad_norm_``) and the mask is applied after it.
* ``"alternating"`` (a fastclu variant, kept for comparison): every ``K``-th iteration is a
  forget step *instead of* the remain step (``T`` optimizer steps); the clip bounds the norm of
  the masked forget gradient (the fused clip of :meth:`fastclu.optim.SGD.step`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastclu.losses import LossFn, as_loader, per_example, reduce_mean, resolve_loss, to_device
from fastclu.methods.common import (
    Callback,
    MethodResult,
    Monitor,
    Timer,
    adaptive_weighted,
    check_int,
    cosine,
    cycle,
    make_optimizer,
    model_device,
    trainable,
    use_backend,
)

__all__ = ["LOOPS", "balanced_mask", "sfron"]

LOOPS = ("official", "alternating")


def balanced_mask(
    model: nn.Module, forget: Any, remain: Any, gamma: float = 1.0, *, loss_fn: LossFn | None = None,
    batch_size: int = 64, seed: int = 0,
):  # fmt: skip
    """SFR-on's mask ``[F_forget >= gamma * F_remain]`` from per-batch squared-gradient Fishers.

    Scored over the model's trainable parameters only; returns a named
    :class:`fastclu.saliency.SaliencyMask` (``named_parameters`` names of those parameters).
    """
    from fastclu import saliency

    names = [n for n, _ in trainable(model)]
    params = [p for _, p in trainable(model)]
    was = model.training
    model.eval()  # a Fisher is a property of the weights: no dropout / batch-norm updates
    try:
        f_f = saliency.fisher(model, as_loader(forget, batch_size, seed=seed), loss_fn, params=params)
        f_r = saliency.fisher(model, as_loader(remain, batch_size, seed=seed), loss_fn, params=params)
    finally:
        model.train(was)
    return saliency.ratio_mask(f_f, f_r, gamma=gamma, names=names)


def _check(iters: int, forget_every: int, mask_mode: str, lam: float, clip: float | None, loop: str) -> None:
    check_int("iters", iters, 1)
    check_int("forget_every", forget_every, 1)
    if mask_mode not in ("grad", "update"):
        raise ValueError(f"mask_mode must be 'grad' or 'update', got {mask_mode!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")


def sfron(
    model: nn.Module,
    forget: Any,
    remain: Any,
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
    loop: str = "official",
    loss_fn: LossFn | None = None,
    optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    callback: Callback | None = None,
    log_every: int = 50,
    backend: str | None = None,
) -> MethodResult:
    """Unlearn ``forget``'s examples from ``model`` (in place) with SFR-on.

    Args:
        model: the trained model; its trainable parameters are updated.
        forget, remain: DataLoaders, Datasets or iterables of batches (:mod:`fastclu.losses`).
        iters: iterations T (cosine schedules of lr and alpha_f run over T). Paper: 1500.
        forget_every: K; iterations ``t % K == 0`` carry a forget step (the first one included). Paper: 5.
        lr, momentum, weight_decay: the shared optimizer (paper: SGD 0.01, 0.9, 5e-4).
        alpha_f: forget weight at t = 0, cosine-decayed to 0 at T. Paper: 25.
        clip: global-norm bound on the forget update (None: no clipping); see the module
            docstring for what each loop clips. Paper: 7.0 (ResNet-18 gradient-norm units).
        lam: temperature of the adaptive forget-loss weights (0: plain mean). Paper: 0.5.
        gamma: balanced-mask threshold (paper: 1); None disables the mask.
        mask_mode: ``"grad"`` (only the forget gradient is gated; the SFR-on choice) or
            ``"update"`` (masked-out weights do not move on any step).
        loop: ``"official"`` or ``"alternating"`` (module docstring).
        loss_fn: per-example losses (``[B]`` needed: the forget loss weights each example).
        optimizer, optimizer_kwargs, batch_size, seed, progress, callback, log_every, backend:
            as in :mod:`fastclu.methods.baselines`.

    Returns:
        MethodResult with wall time (mask computation included) and the number of optimizer
        steps; ``info`` holds the loop, the mask density and the forget / remain step counts.
    """
    _check(iters, forget_every, mask_mode, lam, clip, loop)
    loss_fn = resolve_loss(loss_fn)
    fl, rl = as_loader(forget, batch_size, seed=seed, name="forget"), as_loader(remain, batch_size, seed=seed + 1,
                                                                               name="remain")  # fmt: skip
    dev = model_device(model)
    info: dict = {"loop": loop}
    n_forget = len(range(0, iters, forget_every))
    n_remain = iters if loop == "official" else iters - n_forget
    mon = Monitor("SFR-on", iters, model, progress=progress, callback=callback, log_every=log_every)
    try:
        with use_backend(backend), Timer(dev) as tm:
            params = [p for _, p in trainable(model)]
            opt = make_optimizer(params, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                 optimizer_kwargs=optimizer_kwargs)  # fmt: skip
            if gamma is not None:
                mask = balanced_mask(model, fl, rl, gamma, loss_fn=loss_fn)
                # "grad" gates only the forget role; "update" freezes masked-out weights on every step.
                opt.set_mask(mask, mode=mask_mode, roles=["forget"], names=model)
                info["mask_density"] = float(mask.density())
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, iters))
            model.train()
            fit, rit = cycle(fl), cycle(rl)
            last_forget: Tensor | None = None
            for t in range(iters):
                losses: dict[str, Tensor] = {}
                forget_now = t % forget_every == 0
                if forget_now:
                    last_forget = _forget_step(model, opt, to_device(next(fit), dev), loss_fn, params,
                                               alpha_f * cosine(t, iters), lam, clip, loop)  # fmt: skip
                if loop == "official" or not forget_now:
                    opt.zero_grad(set_to_none=True)
                    loss = reduce_mean(loss_fn(model, to_device(next(rit), dev)))
                    loss.backward()
                    opt.step()
                    losses["remain_loss"] = loss
                if last_forget is not None:
                    losses["forget_loss"] = last_forget
                sched.step()
                mon.update(losses)
            opt.zero_grad(set_to_none=True)
    finally:
        mon.close()
    info.update(forget_steps=n_forget, remain_steps=n_remain, iters=iters)
    return MethodResult("SFR-on", tm.elapsed - mon.callback_s, n_forget + n_remain, info, mon.history)


def _forget_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any, loss_fn: LossFn, params: list[Tensor],
                 alpha: float, lam: float, clip: float | None, loop: str) -> Tensor:  # fmt: skip
    """One masked ascent step on the adaptively weighted forget loss; returns that loss (detached)."""
    opt.zero_grad(set_to_none=True)
    loss = adaptive_weighted(per_example(loss_fn(model, batch), "SFR-on's forget loss"), lam)
    loss.backward()
    coeff: float | Tensor = -alpha
    if loop == "official" and clip is not None:
        # clip_grad_norm_ of alpha * grad before the mask, as the official code (no host sync).
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        coeff = -alpha * (clip / (alpha * norm.double() + 1e-6)).clamp(max=1.0).float()
    opt.stash("forget")
    opt.step(combine={"forget": coeff}, clip=clip if loop == "alternating" else None)
    return loss.detach()
