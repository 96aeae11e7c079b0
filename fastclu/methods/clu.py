"""UG-CLU: a task-agnostic stream of learn and unlearn requests with one shared optimizer state.

* learn request: each step descends the new data's loss and the replay buffer's loss,
  combined in one fused update (``combine={"learn": 1, "grad": 1}``); afterwards a few
  examples per class of the new data join the replay buffer.
* unlearn request: the requested examples leave the replay buffer; a balanced saliency mask
  (forget Fisher >= gamma * replay Fisher) gates the unlearn gradient; every ``K``-th step
  combines the ascent on the adaptively weighted unlearn loss (weight ``-alpha_f(t)``,
  cosine-decayed) with the replay gradient, clipped; the other steps descend on replay data
  (SFR-on's fast-slow scheme with replay as the remain set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastclu.data import Request, Subset, loader
from fastclu.methods.common import MethodResult, Timer, adaptive_forget_loss, cosine, cycle, sgd, use_backend
from fastclu.methods.sfron import balanced_mask

__all__ = ["ug_clu"]


def _replay_sample(data: Subset, per_class: int, g: torch.Generator) -> Subset:
    keep = []
    for c in data.y.unique().tolist():
        idx = (data.y == c).nonzero().flatten()
        keep.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    return data.take(torch.cat(keep)) if keep else data


def ug_clu(
    model: nn.Module,
    requests: Sequence[Request],
    *,
    learn_steps: int = 250,
    learn_lr: float = 0.05,
    unlearn_iters: int = 300,
    unlearn_lr: float = 0.01,
    forget_every: int = 5,
    alpha_f: float = 25.0,
    clip: float | None = 3.0,
    lam: float = 0.5,
    gamma: float | None = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    replay_per_class: int = 60,
    batch_size: int = 64,
    seed: int = 0,
    after_request: Callable[[int, Request, nn.Module], None] | None = None,
    backend: str | None = None,
) -> MethodResult:
    """Serve a stream of learn / unlearn requests on ``model``, in place.

    Args:
        requests: :class:`fastclu.data.Request` items (``kind`` "learn" or "unlearn").
        learn_steps, learn_lr: steps and peak learning rate (cosine) per learn request.
        unlearn_iters, unlearn_lr, forget_every, alpha_f, clip, lam, gamma: per unlearn
            request, as in :func:`fastclu.methods.sfron.sfron` (gamma None: no mask).
        momentum, weight_decay: the SGD optimizer, one per request (state shared by the
            request's learn/unlearn and replay roles).
        replay_per_class: examples per class of each learned request kept for replay.
        after_request: ``after_request(i, request, model)`` after each request (not timed).

    Returns:
        MethodResult; ``info["requests"]`` has per-request steps, wall time and mask density.
    """
    for name, v in (("learn_steps", learn_steps), ("unlearn_iters", unlearn_iters),
                    ("forget_every", forget_every), ("replay_per_class", replay_per_class)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for i, r in enumerate(requests):
        if not isinstance(r, Request) or r.kind not in ("learn", "unlearn"):
            raise ValueError(f"requests[{i}] must be a Request of kind 'learn' or 'unlearn'")
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    replay: Subset | None = None
    log, wall, total = [], 0.0, 0
    with use_backend(backend):
        for i, req in enumerate(requests):
            entry: dict = {"name": req.name, "kind": req.kind}
            with Timer(dev) as tm:
                data_ld = loader(req.data, batch_size, seed=seed + i)
                rep_ld = (
                    loader(replay, batch_size, seed=seed + 1000 + i) if replay is not None and len(replay) else None
                )
                if req.kind == "learn":
                    n = _learn(model, data_ld, rep_ld, learn_steps, learn_lr, momentum, weight_decay, dev)
                    new = _replay_sample(req.data, replay_per_class, g)
                    replay = new if replay is None else Subset.cat([replay, new])
                else:
                    if replay is not None:
                        replay = replay.without(req.data)
                        rep_ld = loader(replay, batch_size, seed=seed + 1000 + i) if len(replay) else None
                    if rep_ld is None:
                        raise ValueError(f"requests[{i}] ({req.name}): nothing left to replay after unlearning")
                    n, density = _unlearn(model, data_ld, rep_ld, unlearn_iters, unlearn_lr, forget_every, alpha_f,
                                          clip, lam, gamma, momentum, weight_decay, dev)  # fmt: skip
                    entry["mask_density"] = density
            entry.update(steps=n, wall_s=tm.elapsed)
            log.append(entry)
            wall += tm.elapsed
            total += n
            if after_request is not None:
                after_request(i, req, model)
    return MethodResult("UG-CLU", wall, total, {"requests": log, "replay_size": 0 if replay is None else len(replay)})


def _learn(model, data_ld, rep_ld, steps, lr, momentum, wd, dev) -> int:
    opt = sgd(model, lr, momentum, wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, steps))
    model.train()
    it = cycle(data_ld)
    rit = cycle(rep_ld) if rep_ld is not None else None
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
        if rit is None:
            opt.step()
        else:
            opt.stash("learn")
            xr, yr = next(rit)
            F.cross_entropy(model(xr.to(dev)), yr.to(dev)).backward()
            opt.step(combine={"learn": 1.0, "grad": 1.0})
        sched.step()
    opt.zero_grad(set_to_none=True)
    return steps


def _unlearn(model, data_ld, rep_ld, iters, lr, every, alpha_f, clip, lam, gamma, momentum, wd, dev):
    opt = sgd(model, lr, momentum, wd)
    density = None
    if gamma is not None:
        mask = balanced_mask(model, data_ld, rep_ld, gamma)
        opt.set_mask(mask, mode="grad", roles=["unlearn"])
        density = float(mask.density())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, iters))
    model.train()
    fit, rit = cycle(data_ld), cycle(rep_ld)
    for t in range(iters):
        opt.zero_grad(set_to_none=True)
        if t % every == 0:
            x, y = next(fit)
            adaptive_forget_loss(model(x.to(dev)), y.to(dev), lam).backward()
            opt.stash("unlearn")
            xr, yr = next(rit)
            F.cross_entropy(model(xr.to(dev)), yr.to(dev)).backward()
            opt.step(combine={"unlearn": -alpha_f * cosine(t, iters), "grad": 1.0}, clip=clip)
        else:
            xr, yr = next(rit)
            F.cross_entropy(model(xr.to(dev)), yr.to(dev)).backward()
            opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return iters, density
