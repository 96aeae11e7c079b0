"""Shared pieces of the methods: results, backend selection, schedules, loaders, training loops."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MethodResult",
    "Timer",
    "adaptive_forget_loss",
    "cosine",
    "cycle",
    "make_mlp",
    "sgd",
    "task_loss",
    "train",
    "use_backend",
]


@dataclass
class MethodResult:
    """What a method reports: its name, wall time (seconds), optimizer steps, and extras.

    The model the method was given is modified in place; ``info`` holds method-specific
    numbers (mask density, merge coefficients, ...), JSON-serialisable.
    """

    name: str
    wall_s: float
    steps: int
    info: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "wall_s": self.wall_s, "steps": self.steps, "info": self.info}


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


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """fastclu's SGD over the model's trainable parameters."""
    from fastclu.optim import SGD

    return SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)


def adaptive_forget_loss(logits: Tensor, y: Tensor, lam: float) -> Tensor:
    """SFR-on's adaptively weighted forget loss ``sum_i w_i * l_i``, ``w_i ∝ 1 / (stopgrad(l_i)^lam + 1e-15)``.

    Examples the model has already forgotten (large loss) get small weights, so the ascent
    concentrates on those still remembered instead of blowing up one loss. ``lam = 0`` is the
    plain mean.
    """
    losses = F.cross_entropy(logits, y, reduction="none")
    c = 1.0 / (losses.detach().clamp_min(0.0) ** lam + 1e-15)
    return (c / c.sum() * losses).sum()


def task_loss(classes: Sequence[int] | None) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy restricted to ``classes`` (the "labels trick" of class-incremental learning).

    Logits of other classes are masked out of the softmax, so training on one task does not
    push down the outputs of classes it does not contain. ``None``: plain cross-entropy.
    """
    if classes is None:
        return F.cross_entropy
    cls = sorted({int(c) for c in classes})

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[cls] = True
        return F.cross_entropy(logits.masked_fill(~allowed, -1e4), y)

    return loss


def _xy(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def train(
    model: nn.Module,
    loader: Iterable,
    steps: int,
    *,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: bool = True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    optimizer: torch.optim.Optimizer | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Plain minibatch training for ``steps`` steps with fastclu's SGD (cosine LR when ``schedule``).

    Returns the number of optimizer steps taken.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    dev = next(model.parameters()).device
    opt = optimizer if optimizer is not None else sgd(model, lr, momentum, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine(t, steps)) if schedule else None
    model.train()
    it = cycle(loader)
    for _ in range(steps):
        x, y = _xy(next(it), dev)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if progress is not None:
            progress(1)
    return steps
