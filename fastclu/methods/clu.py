"""UG-CLU: a task-agnostic stream of learn and unlearn requests with one shared optimizer state.

* learn request: each step descends the new data's loss and the replay buffer's loss,
  combined in one fused update (``combine={"learn": 1, "grad": 1}``); afterwards a few
  examples per class of the new data join the replay buffer.
* unlearn request: the requested examples leave the replay buffer; a balanced saliency mask
  (forget Fisher >= gamma * replay Fisher, over the trainable parameters) gates the unlearn
  gradient; every ``K``-th step combines the ascent on the adaptively weighted unlearn loss
  (weight ``-alpha_f(t)``, cosine-decayed) with the replay gradient, clipped; the other steps
  descend on replay data (SFR-on's fast-slow scheme with replay as the remain set).

A request's ``data`` is any map-style Dataset of ``(x, y, ...)`` tuples or HF-style dicts (a
:class:`fastclu.data.Subset`, a ``TensorDataset``, a ``torch.utils.data.Subset``, ...).
Examples are identified across requests by their ids (:class:`fastclu.data.Subset`), by their
index into the same underlying dataset (``torch.utils.data.Subset`` views), or by object and
index otherwise, so an unlearn request removes from the replay buffer exactly the examples it
names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fastclu import data as D
from fastclu.losses import (
    ExampleList,
    LossFn,
    as_loader,
    per_example,
    reduce_mean,
    resolve_loss,
    split_batch,
    to_device,
)
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
from fastclu.methods.sfron import balanced_mask

__all__ = ["ug_clu"]


def _keys(ds: Dataset) -> list[Any]:
    """A hashable identity per example of ``ds`` (see the module docstring)."""
    if isinstance(ds, D.Subset):
        return [("digits", i) for i in ds.ids.tolist()]
    if isinstance(ds, torch.utils.data.Subset):
        base = _keys(ds.dataset)
        return [base[i] for i in ds.indices]
    return [(id(ds), i) for i in range(len(ds))]


def _labels(ds: Dataset) -> Tensor:
    if isinstance(ds, D.Subset):
        return ds.y.cpu()
    ys = [split_batch(ds[i])[1] for i in range(len(ds))]
    if any(y is None for y in ys):
        raise ValueError("ug_clu: every example of a learn request needs a label (tuple field 1 or 'labels')")
    return torch.as_tensor([int(y) for y in ys])


@dataclass
class _Replay:
    """The replay buffer: examples (as their datasets return them) and their identities."""

    examples: list[Any]
    keys: list[Any]

    def add_sample(self, ds: Dataset, per_class: int, g: torch.Generator) -> None:
        y, keys = _labels(ds), _keys(ds)
        for c in y.unique().tolist():
            idx = (y == c).nonzero().flatten()
            for i in idx[torch.randperm(idx.numel(), generator=g)[:per_class]].tolist():
                self.examples.append(ds[i])
                self.keys.append(keys[i])

    def remove(self, ds: Dataset) -> None:
        gone = set(_keys(ds))
        kept = [(e, k) for e, k in zip(self.examples, self.keys) if k not in gone]
        self.examples, self.keys = [e for e, _ in kept], [k for _, k in kept]

    def loader(self, batch_size: int, seed: int) -> DataLoader | None:
        if not self.examples:
            return None
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ExampleList(self.examples), batch_size=batch_size, shuffle=True, generator=g)


@dataclass
class _Run:
    """What every step of one ug_clu call needs."""

    model: nn.Module
    loss_fn: LossFn
    optimizer: Any
    optimizer_kwargs: Mapping[str, Any] | None
    momentum: float
    weight_decay: float
    dev: torch.device
    monitor: Monitor

    def opt(self, lr: float) -> torch.optim.Optimizer:
        return make_optimizer([p for _, p in trainable(self.model)], self.optimizer, lr=lr, momentum=self.momentum,
                              weight_decay=self.weight_decay, optimizer_kwargs=self.optimizer_kwargs)  # fmt: skip

    def loss(self, batch: Any) -> Tensor:
        return reduce_mean(self.loss_fn(self.model, to_device(batch, self.dev)))


def ug_clu(
    model: nn.Module,
    requests: Sequence[D.Request],
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
    after_request: Callable[[int, D.Request, nn.Module], None] | None = None,
    loss_fn: LossFn | None = None,
    optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    callback: Callback | None = None,
    log_every: int = 50,
    backend: str | None = None,
) -> MethodResult:
    """Serve a stream of learn / unlearn requests on ``model``, in place.

    Args:
        requests: :class:`fastclu.data.Request` items (``kind`` "learn" or "unlearn").
        learn_steps, learn_lr: steps and peak learning rate (cosine) per learn request.
        unlearn_iters, unlearn_lr, forget_every, alpha_f, clip, lam, gamma: per unlearn
            request, as in :func:`fastclu.methods.sfron.sfron`'s alternating loop (gamma None:
            no mask; the clip is the fused clip of the combined, masked update).
        momentum, weight_decay: the optimizer, one per request (state shared by the
            request's learn/unlearn and replay roles).
        replay_per_class: examples per class of each learned request kept for replay.
        after_request: ``after_request(i, request, model)`` after each request (not timed).
        loss_fn, optimizer, optimizer_kwargs, progress, callback, log_every, backend: as in
            :mod:`fastclu.methods.baselines` (history entries carry ``"task"``: the request index).

    Returns:
        MethodResult; ``info["requests"]`` has per-request steps, wall time and mask density.
    """
    for name, v in (("learn_steps", learn_steps), ("unlearn_iters", unlearn_iters),
                    ("forget_every", forget_every), ("replay_per_class", replay_per_class)):  # fmt: skip
        check_int(name, v, 1)
    for i, r in enumerate(requests):
        if not isinstance(r, D.Request) or r.kind not in ("learn", "unlearn"):
            raise ValueError(f"requests[{i}] must be a Request of kind 'learn' or 'unlearn'")
    total = sum(learn_steps if r.kind == "learn" else unlearn_iters for r in requests)
    mon = Monitor("UG-CLU", total, model, progress=progress, callback=callback, log_every=log_every)
    run = _Run(model, resolve_loss(loss_fn), optimizer, optimizer_kwargs, momentum, weight_decay,
               model_device(model), mon)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    replay = _Replay([], [])
    log, wall, steps = [], 0.0, 0
    try:
        with use_backend(backend):
            for i, req in enumerate(requests):
                entry: dict = {"name": req.name, "kind": req.kind}
                with Timer(run.dev) as tm:
                    spent = mon.callback_s
                    data_ld = as_loader(req.data, batch_size, seed=seed + i, name=f"requests[{i}].data")
                    if req.kind == "learn":
                        n = _learn(run, data_ld, replay.loader(batch_size, seed + 1000 + i), learn_steps, learn_lr, i)
                        replay.add_sample(req.data, replay_per_class, g)
                    else:
                        replay.remove(req.data)
                        rep_ld = replay.loader(batch_size, seed + 1000 + i)
                        if rep_ld is None:
                            raise ValueError(f"requests[{i}] ({req.name}): nothing left to replay after unlearning")
                        n, entry["mask_density"] = _unlearn(run, data_ld, rep_ld, unlearn_iters, unlearn_lr,
                                                            forget_every, alpha_f, clip, lam, gamma, i)  # fmt: skip
                elapsed = tm.elapsed - (mon.callback_s - spent)
                entry.update(steps=n, wall_s=elapsed)
                log.append(entry)
                wall += elapsed
                steps += n
                if after_request is not None:
                    after_request(i, req, model)
    finally:
        mon.close()
    return MethodResult("UG-CLU", wall, steps, {"requests": log, "replay_size": len(replay.examples)}, mon.history)


def _learn(run: _Run, data_ld: Any, rep_ld: Any, steps: int, lr: float, task: int) -> int:
    opt = run.opt(lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, steps))
    run.model.train()
    it = cycle(data_ld)
    rit = cycle(rep_ld) if rep_ld is not None else None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = run.loss(next(it))
        loss.backward()
        losses = {"learn_loss": loss}
        if rit is None:
            opt.step()
        else:
            opt.stash("learn")
            rloss = run.loss(next(rit))
            rloss.backward()
            opt.step(combine={"learn": 1.0, "grad": 1.0})
            losses["replay_loss"] = rloss
        sched.step()
        run.monitor.update(losses, task)
    opt.zero_grad(set_to_none=True)
    return steps


def _unlearn(run: _Run, data_ld, rep_ld, iters, lr, every, alpha_f, clip, lam, gamma, task) -> tuple[int, float | None]:  # fmt: skip
    opt = run.opt(lr)
    density = None
    if gamma is not None:
        mask = balanced_mask(run.model, data_ld, rep_ld, gamma, loss_fn=run.loss_fn)
        opt.set_mask(mask, mode="grad", roles=["unlearn"], names=run.model)
        density = float(mask.density())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, iters))
    run.model.train()
    fit, rit = cycle(data_ld), cycle(rep_ld)
    for t in range(iters):
        opt.zero_grad(set_to_none=True)
        losses = {}
        if t % every == 0:
            batch = to_device(next(fit), run.dev)
            floss = adaptive_weighted(per_example(run.loss_fn(run.model, batch), "UG-CLU's unlearn loss"), lam)
            floss.backward()
            opt.stash("unlearn")
            losses["unlearn_loss"] = floss
            rloss = run.loss(next(rit))
            rloss.backward()
            opt.step(combine={"unlearn": -alpha_f * cosine(t, iters), "grad": 1.0}, clip=clip)
        else:
            rloss = run.loss(next(rit))
            rloss.backward()
            opt.step()
        losses["replay_loss"] = rloss
        sched.step()
        run.monitor.update(losses, task)
    opt.zero_grad(set_to_none=True)
    return iters, density
