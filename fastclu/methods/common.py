"""Shared pieces of the methods: results, backend selection, schedules, loaders, training loops."""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Callback",
    "MethodResult",
    "Monitor",
    "Timer",
    "adaptive_forget_loss",
    "adaptive_weighted",
    "check_int",
    "cosine",
    "cycle",
    "make_mlp",
    "make_optimizer",
    "model_device",
    "negated",
    "sgd",
    "task_loss",
    "train",
    "trainable",
    "use_backend",
]


@dataclass
class MethodResult:
    """What a method reports: its name, wall time (seconds), optimizer steps, extras and history.

    The model the method was given is modified in place; ``info`` holds method-specific
    numbers (mask density, merge coefficients, ...), JSON-serialisable. ``history`` has one
    entry per callback point (every ``log_every`` steps and the last step): ``{"step": int,
    "task": int (sequential methods), "loss" / "forget_loss" / ...: float, **callback's dict}``.
    ``wall_s`` excludes the time spent in the callback.
    """

    name: str
    wall_s: float
    steps: int
    info: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "wall_s": self.wall_s, "steps": self.steps, "info": self.info,
                "history": self.history}  # fmt: skip


class Timer:
    """Context manager measuring wall time in seconds (``.elapsed``), synchronising CUDA."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.elapsed = 0.0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Self:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.elapsed = time.perf_counter() - self._t0


def use_backend(backend: str | None) -> contextlib.AbstractContextManager[None]:
    """Run the body with ops defaulting to ``backend`` (``None``: leave selection as is).

    Delegates to :func:`fastclu.use_backend`, a scoped override (a context variable, never the
    process environment) that reaches every op an optimizer or mask routine calls, whatever
    their own signatures, and is undone on exit.
    """
    from fastclu._registry import use_backend as scoped

    return scoped(backend)


def cosine(t: int, total: int, start: float = 1.0, end: float = 0.0) -> float:
    """Cosine decay from ``start`` (t = 0) to ``end`` (t = total)."""
    if total <= 0:
        return start
    frac = min(max(t / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def cycle(loader: Iterable) -> Iterator:
    """Endless iteration over a loader (a fresh pass, reshuffled, each time it runs out)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("cannot cycle over an empty loader")


def make_mlp(
    in_features: int = 64, hidden: tuple[int, ...] = (128, 128), classes: int = 10, *, seed: int = 0
) -> nn.Sequential:
    """A ReLU MLP ``in_features -> hidden... -> classes``, initialised from ``seed`` (global RNG untouched)."""
    layers: list[nn.Module] = []
    dims = (in_features, *hidden)
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], classes))
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                # Kaiming-uniform like torch's default, drawn from our own generator.
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
    return model


def check_int(name: str, v: object, minimum: int = 0) -> int:
    """``v`` as an int >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of every parameter of ``model`` that requires grad (named_parameters order)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not out:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return out


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first trainable parameter (batches are moved there)."""
    return trainable(model)[0][1].device


def make_optimizer(
    params: Sequence[Tensor],
    optimizer: str | Callable[[list[Tensor]], torch.optim.Optimizer] = "sgd",
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer_kwargs: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """A fastclu optimizer over ``params``: ``"sgd"`` (lr, momentum, weight_decay), ``"adamw"`` (lr,
    weight_decay; betas / eps through ``optimizer_kwargs``), or ``optimizer(params)`` for a factory
    returning a :class:`fastclu.optim.SGD` / :class:`fastclu.optim.AdamW` (methods need their
    roles and masks)."""
    from fastclu.optim import SGD, AdamW
    from fastclu.optim._base import RoleOptimizer

    kw = dict(optimizer_kwargs or {})
    params = list(params)
    if optimizer == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)
    if optimizer == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    if isinstance(optimizer, str):
        raise ValueError(f"optimizer must be 'sgd', 'adamw' or a factory params -> optimizer, got {optimizer!r}")  # noqa: TRY004
    if not callable(optimizer):
        raise TypeError(f"optimizer must be 'sgd', 'adamw' or a factory params -> optimizer, got {optimizer!r}")
    opt = optimizer(params)
    if not isinstance(opt, RoleOptimizer):
        raise TypeError(f"optimizer factory must return a fastclu SGD / AdamW, got {type(opt).__name__}")
    return opt


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """fastclu's SGD over the model's trainable parameters."""
    return make_optimizer([p for _, p in trainable(model)], "sgd", lr=lr, momentum=momentum, weight_decay=weight_decay)


def adaptive_weighted(losses: Tensor, lam: float) -> Tensor:
    """SFR-on's adaptive weighting ``sum_i w_i * l_i`` of per-example losses ``[B]``,
    ``w_i = c_i / sum_j c_j``, ``c_i = 1 / (stopgrad(l_i)^lam + 1e-15)``.

    Examples the model has already forgotten (large loss) get small weights, so the ascent
    concentrates on those still remembered instead of blowing up one loss. ``lam = 0`` is the
    plain mean.
    """
    c = 1.0 / (losses.detach().clamp_min(0.0) ** lam + 1e-15)
    return (c / c.sum() * losses).sum()


def adaptive_forget_loss(logits: Tensor, y: Tensor, lam: float) -> Tensor:
    """:func:`adaptive_weighted` of the per-example cross-entropies of ``logits [B, C]``, ``y [B]``."""
    return adaptive_weighted(F.cross_entropy(logits, y, reduction="none"), lam)


def task_loss(classes: Sequence[int] | None) -> Callable[[Tensor, Tensor], Tensor]:
    """``criterion(logits, y)``: batch-mean cross-entropy restricted to ``classes`` (the "labels trick").

    The methods take the contract form, :func:`fastclu.losses.masked_classification_loss`;
    this criterion form is kept for direct use on logits. ``None``: plain cross-entropy.
    """
    if classes is None:
        return F.cross_entropy
    cls = sorted({int(c) for c in classes})

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[cls] = True
        return F.cross_entropy(logits.masked_fill(~allowed, -1e4), y)

    return loss


Callback = Callable[[int, dict, nn.Module], "Mapping[str, Any] | None"]


class Monitor:
    """Progress bar, periodic loss logging and the user's callback for one method run.

    Every ``log_every`` steps (and at the last step) the losses are read (one host sync) and
    ``callback(step, losses, model)`` is called with the model in eval mode (restored after);
    a mapping it returns (e.g. accuracies: continual evaluation) joins the history entry.
    """

    def __init__(self, name: str, total: int, model: nn.Module, *, progress: bool = True,
                 callback: Callback | None = None, log_every: int = 50) -> None:  # fmt: skip
        from tqdm.auto import tqdm

        check_int("log_every", log_every, 1)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable as callback(step, losses, model) or None")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        self.model, self.total, self.callback, self.log_every = model, total, callback, log_every
        self.bar = tqdm(total=total, desc=name, disable=not progress, leave=False, file=sys.stderr)
        self.history: list[dict] = []
        self.step = 0
        self.callback_s = 0.0

    def update(self, losses: Mapping[str, Tensor], task: int | None = None) -> None:
        self.step += 1
        self.bar.update(1)
        if self.step % self.log_every and self.step != self.total:
            return
        t0 = time.perf_counter()
        vals = {k: float(v.detach()) for k, v in losses.items()}
        entry: dict[str, Any] = {"step": self.step, **({} if task is None else {"task": task}), **vals}
        if self.callback is not None:
            was = self.model.training
            self.model.eval()
            try:
                extra = self.callback(self.step, dict(vals), self.model)
            finally:
                self.model.train(was)
            if extra is not None:
                if not isinstance(extra, Mapping):
                    raise TypeError(f"callback must return a mapping or None, got {type(extra).__name__}")
                entry.update(extra)
        self.history.append(entry)
        self.bar.set_postfix(vals, refresh=False)
        self.callback_s += time.perf_counter() - t0

    def close(self) -> None:
        self.bar.close()


def negated(loss_fn: Callable[[nn.Module, Any], Tensor]) -> Callable[[nn.Module, Any], Tensor]:
    """``-loss_fn``: gradient ascent on the same per-example losses."""

    def loss(model: nn.Module, batch: Any) -> Tensor:
        return -loss_fn(model, batch)

    return loss


def train(
    model: nn.Module,
    data: Any,
    steps: int,
    *,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: bool = True,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    optimizer: Any = "sgd",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    monitor: Monitor | None = None,
    task: int | None = None,
) -> int:
    """Minibatch training of the mean of ``loss_fn`` (contract form) for ``steps`` steps.

    ``optimizer``: ``"sgd"`` / ``"adamw"`` / a factory (:func:`make_optimizer`) or an optimizer
    instance used as is; cosine learning rate over ``steps`` when ``schedule``. ``monitor``
    receives each step's loss. Returns the number of optimizer steps taken.
    """
    from fastclu.losses import as_loader, reduce_mean, resolve_loss, to_device

    check_int("steps", steps)
    loss_fn = resolve_loss(loss_fn)
    loader = as_loader(data, batch_size, seed=seed)
    dev = model_device(model)
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    else:
        params = [p for _, p in trainable(model)]
        opt = make_optimizer(params, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                             optimizer_kwargs=optimizer_kwargs)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, steps)) if schedule else None
    model.train()
    it = cycle(loader)
    for _ in range(steps):
        batch = to_device(next(it), dev)
        opt.zero_grad(set_to_none=True)
        loss = reduce_mean(loss_fn(model, batch))
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if monitor is not None:
            monitor.update({"loss": loss}, task)
    opt.zero_grad(set_to_none=True)
    return steps
