"""Perturb-and-Merge (P&M) over a task sequence, and the accuracy matrix it produces.

Each task is trained at ``theta + k*eps*delta`` (``delta`` = task vector from the previous
merged model, ``k`` in {0, +1, -1} drawn per step) through :class:`fastclu.optim.PerturbMerge`;
after the task the diagonal Fisher at the task optimum is accumulated and the model is
merged with the closed-form coefficient ``alpha``.

Where ``alpha`` misleads: it minimises a quadratic model of the loss around each task's
optimum whose curvature is the empirical Fisher there. With cross-entropy that Fisher scales
with the squared loss at the optimum, so a task trained to a near-zero loss (a small network
trained from scratch on an easy task: 1e-7) looks flat and loses every merge to tasks fit
less tightly, although moving back along its task vector costs it the whole task (about
ln 2 for two classes). ``info["fisher_trace"]`` and ``info["fit_loss"]`` show this regime;
``normalize_fisher`` is a documented departure from the paper for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from fastclu.losses import LossFn, as_loader, masked_classification_loss, reduce_mean, to_device, unbatch
from fastclu.methods.common import (
    Callback,
    MethodResult,
    Monitor,
    Timer,
    check_int,
    cosine,
    cycle,
    make_optimizer,
    trainable,
    use_backend,
)

__all__ = ["perturb_and_merge"]


@dataclass
class _Setup:
    """One P&M run's fixed pieces."""

    model: nn.Module
    body: list[Tensor]
    head: list[Tensor]
    steps: int
    fisher_samples: int
    opt_args: dict[str, Any]
    monitor: Monitor

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """A fresh inner optimizer for the body (and one for the head) per task."""
        return [make_optimizer(ps, **self.opt_args) for ps in (self.body, self.head) if ps]


def perturb_and_merge(
    model: nn.Module,
    tasks: Sequence[Any],
    *,
    steps_per_task: int = 150,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    eps: float = 0.5,
    probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    fisher_samples: int = 128,
    seed: int = 0,
    task_classes: Sequence[Sequence[int]] | None = None,
    head: Iterable[Tensor] | None = None,
    normalize_fisher: bool = False,
    after_task: Callable[[int, nn.Module], None] | None = None,
    loss_fn: LossFn | None = None,
    optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    callback: Callback | None = None,
    log_every: int = 50,
    backend: str | None = None,
) -> MethodResult:
    """Train ``model`` on the tasks in order with P&M, in place.

    Args:
        tasks: one DataLoader / Dataset / iterable of batches per task.
        steps_per_task: optimizer steps per task (cosine learning rate within each task;
            momentum is reset per task, as each task starts from the merged model).
        eps, probs: P&M's perturbation size and the probabilities of ``k = 0, +1, -1``.
        fisher_samples: examples of the task, at the trained (unperturbed) weights, whose
            squared per-example gradients estimate its diagonal (empirical) Fisher before the
            merge. Per-example, not per-batch: near an optimum a batch-mean gradient averages
            out and would understate the curvature.
        seed: seed of the perturbation draws (and of the shuffling of Datasets).
        task_classes: restrict each task's softmax to its classes (default loss only).
        head: trainable parameters of ``model`` (typically the classifier) that are trained like
            the rest but neither perturbed, nor in the Fisher, nor merged: they keep their
            trained values. This is the paper's setting, where P&M perturbs and merges the
            backbone's task vector (LoRA) and each task's classifier head is trained for that
            task alone. None: every trainable parameter is perturbed and merged.
        normalize_fisher: enter each task's Fisher scaled to unit trace instead of its mean
            (:meth:`~fastclu.optim.PerturbMerge.end_task`). Not in the paper (default off): the
            empirical Fisher at an optimum scales with the squared loss there, so tasks fit to
            different loss levels weigh differently by orders of magnitude in ``alpha``.
        after_task: called as ``after_task(i, model)`` after task ``i`` is merged (not timed).
            Non-contiguous parameters (channels_last) are held in contiguous memory during the
            call (P&M's perturbation ops need it) and get their layout back on return.
        loss_fn, optimizer, optimizer_kwargs, batch_size, progress, callback, log_every, backend:
            as in :mod:`fastclu.methods.baselines`; a callback evaluating every old task every
            ``log_every`` steps is continual evaluation (entries carry ``"task"``).

    Returns:
        MethodResult; ``info["alpha"]`` lists the merge coefficients (None for the first task),
        ``info["fisher_trace"]`` the trace of each task's mean Fisher (before any normalisation)
        and ``info["fit_loss"]`` each task's mean loss over the Fisher examples at its trained
        weights (the two numbers that explain an ``alpha`` near 0 or 1).
    """
    from fastclu.optim import PerturbMerge

    check_int("steps_per_task", steps_per_task)
    check_int("fisher_samples", fisher_samples, 1)
    if task_classes is not None and len(task_classes) != len(tasks):
        raise ValueError(f"task_classes has {len(task_classes)} entries for {len(tasks)} tasks")
    if task_classes is not None and loss_fn is not None:
        raise ValueError("task_classes applies to the default loss only: give loss_fn or task_classes, not both")
    if not isinstance(normalize_fisher, bool):
        raise TypeError(f"normalize_fisher must be a bool, got {type(normalize_fisher).__name__}")
    params = [p for _, p in trainable(model)]
    head_ids = _check_head(head, params)
    body = [p for p in params if id(p) not in head_ids]
    if not body:
        raise ValueError("head holds every trainable parameter of model: nothing is left to perturb and merge")
    mon = Monitor("P&M", steps_per_task * len(tasks), model, progress=progress, callback=callback,
                  log_every=log_every)  # fmt: skip
    run = _Setup(model, body, [p for p in params if id(p) in head_ids], steps_per_task, fisher_samples,
                 {"optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                  "optimizer_kwargs": optimizer_kwargs}, mon)  # fmt: skip
    info: dict[str, Any] = {"alpha": [], "eps": eps, "fisher_trace": [], "fit_loss": [],
                            "normalize_fisher": normalize_fisher, "head_params": len(run.head)}  # fmt: skip
    wall = 0.0
    pm = None
    layouts = _make_contiguous_(params)
    try:
        with use_backend(backend):
            for i, data in enumerate(tasks):
                loss = loss_fn if loss_fn is not None else masked_classification_loss(
                    None if task_classes is None else task_classes[i])  # fmt: skip
                loader = as_loader(data, batch_size, seed=seed + i, name=f"tasks[{i}]")
                with Timer(body[0].device) as tm:
                    spent = mon.callback_s
                    opts = run.optimizers()
                    if pm is None:
                        pm = PerturbMerge(opts[0], eps=eps, probs=probs, seed=seed, backend=backend)
                    else:
                        pm.optimizer = opts[0]  # a fresh inner optimizer per task, same P&M state
                    _train_task(run, pm, opts, loader, loss, i)
                    trace, fit = _task_fisher(run, pm, opts, loader, loss)
                    info["fisher_trace"].append(trace)
                    info["fit_loss"].append(fit)
                    a = pm.end_task(normalize=normalize_fisher)
                    info["alpha"].append(None if a is None else float(a.detach()))
                wall += tm.elapsed - (mon.callback_s - spent)
                if after_task is not None:
                    after_task(i, model)
    finally:
        mon.close()
        _restore_layout_(layouts)
    return MethodResult("P&M", wall, steps_per_task * len(tasks), info, mon.history)


def _make_contiguous_(params: list[Tensor]) -> list[tuple[Tensor, tuple[int, ...]]]:
    """Give non-contiguous (channels_last, transposed) parameters contiguous storage for the run.

    PerturbMerge's perturbation and merge ops work on contiguous memory; the parameter objects
    stay the same (optimizers and hooks keep them), only their ``.data`` is re-laid out.
    Returns what :func:`_restore_layout_` needs to put the original strides back.
    """
    moved = []
    with torch.no_grad():
        for p in params:
            if not p.is_contiguous():
                moved.append((p, p.stride()))
                p.data = p.data.contiguous()
    return moved


def _restore_layout_(moved: list[tuple[Tensor, tuple[int, ...]]]) -> None:
    with torch.no_grad():
        for p, stride in moved:
            p.data = torch.empty_strided(p.shape, stride, dtype=p.dtype, device=p.device).copy_(p.data)


def _train_task(run: _Setup, pm: Any, opts: list, loader: Any, loss_fn: LossFn, task: int) -> None:
    """``run.steps`` steps of the task at P&M's perturbed weights (cosine learning rate)."""
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: cosine(t, run.steps)) for o in opts]
    dev = run.body[0].device
    run.model.train()
    it = cycle(loader)
    for _ in range(run.steps):
        batch = to_device(next(it), dev)
        for o in opts:
            o.zero_grad(set_to_none=True)
        with pm.perturbed():
            loss = reduce_mean(loss_fn(run.model, batch))
            loss.backward()
        pm.step()
        for o in opts[1:]:
            o.step()
        for sc in scheds:
            sc.step()
        run.monitor.update({"loss": loss}, task)


def _task_fisher(run: _Setup, pm: Any, opts: list, loader: Any, loss_fn: LossFn) -> tuple[float, float]:
    """Per-example squared gradients at the trained weights into P&M's Fisher; (trace, mean loss)."""
    dev = run.body[0].device
    seen = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    it = cycle(loader)
    while seen < run.fisher_samples:
        for ex in unbatch(next(it))[: run.fisher_samples - seen]:
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss = reduce_mean(loss_fn(run.model, to_device(default_collate([ex]), dev)))
            loss.backward()
            loss_sum += loss.detach().double()
            pm.accumulate_fisher()
            seen += 1
    for o in opts:
        o.zero_grad(set_to_none=True)
    return float(pm.fisher_trace()), float(loss_sum) / run.fisher_samples


def _check_head(head: Iterable[Tensor] | None, trainable: list[Tensor]) -> set[int]:
    """Ids of the ``head`` parameters, each checked to be a trainable parameter of the model."""
    if head is None:
        return set()
    if isinstance(head, Tensor) or not isinstance(head, Iterable):
        raise TypeError(f"head must be an iterable of parameters of model, got {type(head).__name__}")
    known = {id(p) for p in trainable}
    ids = set()
    for j, p in enumerate(head):
        if not isinstance(p, Tensor) or id(p) not in known:
            raise ValueError(f"head[{j}] is not a trainable parameter of model")
        ids.add(id(p))
    return ids
