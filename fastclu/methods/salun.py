"""SalUn: random-label fine-tuning restricted to the most forget-salient weights.

Saliency is ``|sum_b grad(-loss_forget)|`` over the forget batches; the global top
``density`` fraction of the trainable weights form the mask (exact top-k, deterministic ties).

Data composition (``composition=``):

* ``"official"`` (default; OPTML-Group/Unlearn-Saliency): the forget examples get random labels
  drawn once (uniform over the classes, as that code draws them: a label may equal the true
  one), are joined with the remain examples into one dataset, and training runs over shuffled
  batches of it, so forget examples are ``|D_f| / |D|`` of each batch on average;
* ``"paired"`` (the earlier fastclu loop, kept for comparison): each step takes one forget batch
  (labels redrawn each step, never the true label) and one remain batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from fastclu import data as D
from fastclu.losses import (
    LossFn,
    as_dataset,
    as_loader,
    reduce_mean,
    resolve_loss,
    split_batch,
    to_device,
    with_targets,
)
from fastclu.methods.common import (
    Callback,
    MethodResult,
    Monitor,
    Timer,
    check_int,
    cosine,
    cycle,
    make_optimizer,
    model_device,
    negated,
    trainable,
    use_backend,
)

__all__ = ["COMPOSITIONS", "salun", "salun_mask"]

COMPOSITIONS = ("official", "paired")


def salun_mask(
    model: nn.Module, forget: Any, density: float = 0.5, *, loss_fn: LossFn | None = None, batch_size: int = 64,
    seed: int = 0,
):  # fmt: skip
    """Top-``density`` mask of ``|sum_b grad(-loss_forget)|`` over the model's trainable weights (named)."""
    from fastclu import saliency

    names = [n for n, _ in trainable(model)]
    params = [p for _, p in trainable(model)]
    # |sum_b g_b| is power 1 of the summed gradient: accumulate the gradients, then take |.|.
    loss = negated(resolve_loss(loss_fn))
    dev = params[0].device
    acc = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for p in params]
    was = model.training
    model.eval()
    try:
        for batch in as_loader(forget, batch_size, seed=seed, name="forget"):
            gs = torch.autograd.grad(reduce_mean(loss(model, to_device(batch, dev))), params, allow_unused=True)
            for a, g in zip(acc, gs):
                if g is not None:
                    a.add_(g)
    finally:
        model.train(was)
    return saliency.topk_mask([a.abs() for a in acc], density, names=names)


class _Relabelled(Dataset):
    def __init__(self, base: Dataset, labels: Tensor) -> None:
        self.base, self.labels = base, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        return with_targets(self.base[i], self.labels[i])


def _official_data(forget: Any, remain: Any, classes: int, g: torch.Generator) -> Dataset:
    """Forget examples with random labels drawn once, joined with the remain examples."""
    if isinstance(forget, D.Subset) and isinstance(remain, D.Subset):  # fast path: plain tensors
        y = torch.randint(0, classes, forget.y.shape, generator=g).to(forget.y.device)
        return D.Subset.cat([D.Subset(forget.x, y, forget.ids), remain])
    fds, rds = as_dataset(forget, "forget"), as_dataset(remain, "remain")
    labels = torch.randint(0, classes, (len(fds),), generator=g)
    return ConcatDataset([_Relabelled(fds, labels), rds])


def salun(
    model: nn.Module,
    forget: Any,
    remain: Any,
    *,
    steps: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    density: float = 0.5,
    mask_mode: str = "update",
    classes: int = 10,
    composition: str = "official",
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
    """Unlearn with SalUn, in place.

    Args:
        steps: optimizer steps (over the composed data, cycled; see the module docstring).
        lr, momentum, weight_decay: the optimizer; cosine learning-rate schedule over ``steps``.
        density: fraction of the trainable weights in the saliency mask (SalUn's 0.5).
        mask_mode: ``"update"`` (masked-out weights and their momentum never move, so weight
            decay cannot leak through the mask: SalUn's fix, PR #33) or ``"grad"`` (the original
            code's gradient masking; weight decay and momentum still move every weight).
        classes: number of classes to draw random labels from.
        composition: ``"official"`` or ``"paired"`` (module docstring).
        seed: seed of the random labels and of the shuffling.
        loss_fn, optimizer, optimizer_kwargs, batch_size, progress, callback, log_every, backend:
            as in :mod:`fastclu.methods.baselines` (the data composition relabels the batch's
            targets: tuple field 1 or ``labels``).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if mask_mode not in ("grad", "update"):
        raise ValueError(f"mask_mode must be 'grad' or 'update', got {mask_mode!r}")
    if composition not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
    check_int("steps", steps)
    check_int("classes", classes, 2)
    loss_fn = resolve_loss(loss_fn)
    dev = model_device(model)
    g = torch.Generator().manual_seed(seed)
    mon = Monitor("SalUn", steps, model, progress=progress, callback=callback, log_every=log_every)
    try:
        with use_backend(backend), Timer(dev) as tm:
            mask = salun_mask(model, forget, density, loss_fn=loss_fn, batch_size=batch_size, seed=seed)
            opt = make_optimizer([p for _, p in trainable(model)], optimizer, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay, optimizer_kwargs=optimizer_kwargs)  # fmt: skip
            opt.set_mask(mask, mode=mask_mode, roles=["grad"], names=model)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, steps))
            model.train()
            if composition == "official":
                batches = cycle(as_loader(_official_data(forget, remain, classes, g), batch_size, seed=seed))
            else:
                batches = _paired(forget, remain, classes, g, batch_size, seed)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = reduce_mean(loss_fn(model, to_device(next(batches), dev)))
                loss.backward()
                opt.step()
                sched.step()
                mon.update({"loss": loss})
            opt.zero_grad(set_to_none=True)
    finally:
        mon.close()
    info = {"mask_density": float(mask.density()), "composition": composition}
    return MethodResult("SalUn", tm.elapsed - mon.callback_s, steps, info, mon.history)


def _paired(forget: Any, remain: Any, classes: int, g: torch.Generator, batch_size: int, seed: int):
    """One forget batch (labels shifted by 1..classes-1, redrawn each step) + one remain batch per step."""
    fit = cycle(as_loader(forget, batch_size, seed=seed, name="forget"))
    rit = cycle(as_loader(remain, batch_size, seed=seed + 1, name="remain"))
    while True:
        fb, rb = next(fit), next(rit)
        _, yf, _ = split_batch(fb)
        yf = (yf + torch.randint(1, classes, yf.shape, generator=g).to(yf.device)) % classes
        fb = with_targets(fb, yf)
        yield _concat(fb, rb)


def _concat(a: Any, b: Any) -> Any:
    if isinstance(a, Mapping):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))
