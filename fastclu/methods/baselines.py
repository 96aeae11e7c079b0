"""Baselines: retrain from scratch (the unlearning oracle), fine-tune (FT), gradient ascent (GA),
naive sequential training and joint training (continual-learning bounds).

Common keyword arguments (every method of :mod:`fastclu.methods`):

* ``loss_fn(model, batch) -> Tensor[B]``: per-example losses (:mod:`fastclu.losses`; default
  cross-entropy on ``(x, y)`` tuples or HF-style dict batches);
* ``optimizer``: ``"sgd"`` (with ``lr``, ``momentum``, ``weight_decay``), ``"adamw"`` (``lr``,
  ``weight_decay``) or a factory ``params -> fastclu optimizer``; ``optimizer_kwargs`` go to it;
* ``batch_size``, ``seed``: how a Dataset given instead of a DataLoader is batched and shuffled;
* ``progress`` (tqdm bar, default on), ``callback(step, losses, model) -> dict | None`` called
  every ``log_every`` steps (its dict joins ``MethodResult.history``; its time is not in
  ``wall_s``), ``backend`` (fastclu op backend for the run).

Only the model's trainable parameters (``requires_grad``) are optimised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from fastclu.losses import LossFn, masked_classification_loss, resolve_loss
from fastclu.methods.common import (
    Callback,
    MethodResult,
    Monitor,
    Timer,
    check_int,
    model_device,
    negated,
    train,
    use_backend,  # fmt: skip
)

__all__ = ["finetune", "gradient_ascent", "joint", "naive_sequential", "retrain"]


def retrain(
    model: nn.Module, remain: Any, *, steps: int = 600, lr: float = 0.05, momentum: float = 0.9,
    weight_decay: float = 5e-4, loss_fn: LossFn | None = None, optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None, batch_size: int = 64, seed: int = 0, progress: bool = True,
    callback: Callback | None = None, log_every: int = 50, backend: str | None = None,
) -> MethodResult:  # fmt: skip
    """Oracle: train ``model`` (freshly initialised by the caller) on the remain set only.

    ``steps`` optimizer steps with a cosine learning-rate schedule.
    """
    return _timed_train("retrain", model, remain, steps, dict(locals()))


def finetune(
    model: nn.Module, remain: Any, *, steps: int = 100, lr: float = 0.02, momentum: float = 0.9,
    weight_decay: float = 5e-4, loss_fn: LossFn | None = None, optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None, batch_size: int = 64, seed: int = 0, progress: bool = True,
    callback: Callback | None = None, log_every: int = 50, backend: str | None = None,
) -> MethodResult:  # fmt: skip
    """FT: keep training the original model on the remain set, hoping the forget set fades."""
    return _timed_train("FT", model, remain, steps, dict(locals()))


def gradient_ascent(
    model: nn.Module, forget: Any, *, steps: int = 20, lr: float = 0.005, momentum: float = 0.9,
    weight_decay: float = 5e-4, loss_fn: LossFn | None = None, optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None, batch_size: int = 64, seed: int = 0, progress: bool = True,
    callback: Callback | None = None, log_every: int = 50, backend: str | None = None,
) -> MethodResult:  # fmt: skip
    """GA: ascend the loss on the forget set (no remain data), cosine learning rate."""
    kw = dict(locals())
    kw["loss_fn"] = negated(resolve_loss(loss_fn))
    return _timed_train("GA", model, forget, steps, kw)


def joint(
    model: nn.Module, all_data: Any, *, steps: int = 600, lr: float = 0.05, momentum: float = 0.9,
    weight_decay: float = 5e-4, loss_fn: LossFn | None = None, optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None, batch_size: int = 64, seed: int = 0, progress: bool = True,
    callback: Callback | None = None, log_every: int = 50, backend: str | None = None,
) -> MethodResult:  # fmt: skip
    """Joint training on the union of all tasks at once: the continual-learning upper bound."""
    return _timed_train("joint", model, all_data, steps, dict(locals()))


def naive_sequential(
    model: nn.Module, tasks: Sequence[Any], *, steps_per_task: int = 150, lr: float = 0.05, momentum: float = 0.9,
    weight_decay: float = 5e-4, task_classes: Sequence[Sequence[int]] | None = None,
    after_task: Callable[[int, nn.Module], None] | None = None, loss_fn: LossFn | None = None,
    optimizer: Any = "sgd", optimizer_kwargs: Mapping[str, Any] | None = None, batch_size: int = 64, seed: int = 0,
    progress: bool = True, callback: Callback | None = None, log_every: int = 50, backend: str | None = None,
) -> MethodResult:  # fmt: skip
    """Naive sequential fine-tuning: train on each task in turn, nothing kept from earlier tasks.

    ``task_classes[i]``: restrict task ``i``'s softmax to its classes (the default loss only;
    see :func:`fastclu.losses.masked_classification_loss`); None trains over all classes.
    ``after_task(i, model)`` is called after task ``i`` (e.g. to fill an accuracy matrix); its
    time is excluded from the wall time. A ``callback`` evaluating every old task every
    ``log_every`` steps is continual evaluation (history entries carry ``"task"``).
    """
    if task_classes is not None and len(task_classes) != len(tasks):
        raise ValueError(f"task_classes has {len(task_classes)} entries for {len(tasks)} tasks")
    if task_classes is not None and loss_fn is not None:
        raise ValueError("task_classes applies to the default loss only: give loss_fn or task_classes, not both")
    check_int("steps_per_task", steps_per_task)
    wall, n = 0.0, 0
    mon = Monitor("naive", steps_per_task * len(tasks), model, progress=progress, callback=callback,
                  log_every=log_every)  # fmt: skip
    dev = model_device(model)
    try:
        with use_backend(backend):
            for i, data in enumerate(tasks):
                task_loss_fn = masked_classification_loss(None if task_classes is None else task_classes[i])
                with Timer(dev) as tm:
                    spent = mon.callback_s
                    n += train(model, data, steps_per_task, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               loss_fn=loss_fn if loss_fn is not None else task_loss_fn, optimizer=optimizer,
                               optimizer_kwargs=optimizer_kwargs, batch_size=batch_size, seed=seed + i, monitor=mon,
                               task=i)  # fmt: skip
                wall += tm.elapsed - (mon.callback_s - spent)
                if after_task is not None:
                    after_task(i, model)
    finally:
        mon.close()
    return MethodResult("naive", wall, n, history=mon.history)


def _timed_train(name: str, model: nn.Module, data: Any, steps: int, kw: dict[str, Any]) -> MethodResult:
    """``steps`` cosine-scheduled steps of ``kw["loss_fn"]`` on ``data``, timed (callback excluded), on the backend."""
    check_int("steps", steps)
    mon = Monitor(name, steps, model, progress=kw["progress"], callback=kw["callback"], log_every=kw["log_every"])
    try:
        with use_backend(kw["backend"]), Timer(model_device(model)) as tm:
            n = train(model, data, steps, lr=kw["lr"], momentum=kw["momentum"], weight_decay=kw["weight_decay"],
                      loss_fn=kw["loss_fn"], optimizer=kw["optimizer"], optimizer_kwargs=kw["optimizer_kwargs"],
                      batch_size=kw["batch_size"], seed=kw["seed"], monitor=mon)  # fmt: skip
    finally:
        mon.close()
    return MethodResult(name, tm.elapsed - mon.callback_s, n, history=mon.history)
