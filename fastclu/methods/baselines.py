"""Baselines: retrain from scratch (the unlearning oracle), fine-tune (FT), gradient ascent (GA),
naive sequential training and joint training (continual-learning bounds)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastclu.methods.common import MethodResult, Timer, task_loss, train, use_backend

__all__ = ["finetune", "gradient_ascent", "joint", "naive_sequential", "retrain"]


def _check_steps(name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def retrain(
    model: nn.Module,
    remain_loader: Iterable,
    *,
    steps: int = 600,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    backend: str | None = None,
) -> MethodResult:
    """Oracle: train ``model`` (freshly initialised by the caller) on the remain set only.

    ``steps`` SGD steps with a cosine learning-rate schedule.
    """
    return _timed_train("retrain", model, remain_loader, steps, lr, momentum, weight_decay, backend)


def finetune(
    model: nn.Module,
    remain_loader: Iterable,
    *,
    steps: int = 100,
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    backend: str | None = None,
) -> MethodResult:
    """FT: keep training the original model on the remain set, hoping the forget set fades."""
    return _timed_train("FT", model, remain_loader, steps, lr, momentum, weight_decay, backend)


def gradient_ascent(
    model: nn.Module,
    forget_loader: Iterable,
    *,
    steps: int = 20,
    lr: float = 0.005,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    backend: str | None = None,
) -> MethodResult:
    """GA: ascend the cross-entropy on the forget set (no remain data), cosine learning rate."""
    return _timed_train("GA", model, forget_loader, steps, lr, momentum, weight_decay, backend, _ascent_loss)


def naive_sequential(
    model: nn.Module,
    task_loaders: Sequence[Iterable],
    *,
    steps_per_task: int = 150,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    task_classes: Sequence[Sequence[int]] | None = None,
    after_task: Callable[[int, nn.Module], None] | None = None,
    backend: str | None = None,
) -> MethodResult:
    """Naive sequential fine-tuning: train on each task in turn, nothing kept from earlier tasks.

    ``task_classes[i]``: restrict task ``i``'s softmax to its classes (see
    :func:`~fastclu.methods.common.task_loss`); None trains over all classes.
    ``after_task(i, model)`` is called after task ``i`` (e.g. to fill an accuracy matrix); its
    time is excluded from the wall time.
    """
    if task_classes is not None and len(task_classes) != len(task_loaders):
        raise ValueError(f"task_classes has {len(task_classes)} entries for {len(task_loaders)} tasks")
    _check_steps("steps_per_task", steps_per_task)
    dev = next(model.parameters()).device
    wall, n = 0.0, 0
    with use_backend(backend):
        for i, ld in enumerate(task_loaders):
            with Timer(dev) as tm:
                loss_fn = task_loss(None if task_classes is None else task_classes[i])
                n += train(
                    model, ld, steps_per_task, lr=lr, momentum=momentum, weight_decay=weight_decay, loss_fn=loss_fn
                )
            wall += tm.elapsed
            if after_task is not None:
                after_task(i, model)
    return MethodResult("naive", wall, n)


def joint(
    model: nn.Module,
    all_loader: Iterable,
    *,
    steps: int = 600,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    backend: str | None = None,
) -> MethodResult:
    """Joint training on the union of all tasks at once: the continual-learning upper bound."""
    return _timed_train("joint", model, all_loader, steps, lr, momentum, weight_decay, backend)


def _ascent_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits, y)


def _timed_train(
    name: str, model: nn.Module, loader: Iterable, steps: int, lr: float, momentum: float, weight_decay: float,
    backend: str | None, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> MethodResult:  # fmt: skip
    """``steps`` cosine-scheduled SGD steps of ``loss_fn`` on ``loader``, timed, on ``backend``."""
    _check_steps("steps", steps)
    dev = next(model.parameters()).device
    with use_backend(backend), Timer(dev) as tm:
        n = train(model, loader, steps, lr=lr, momentum=momentum, weight_decay=weight_decay, loss_fn=loss_fn)
    return MethodResult(name, tm.elapsed, n)
