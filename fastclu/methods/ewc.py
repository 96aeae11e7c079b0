"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) over a task sequence.

After each task ``t`` the diagonal empirical Fisher ``F_t`` at the trained weights ``theta*_t``
is taken with :func:`fastclu.saliency.fisher` (per example: ``fisher_samples`` batches of one);
the next tasks train with the penalty ``(lam / 2) * sum_t sum_i F_t,i (theta_i - theta*_t,i)**2``,
fused into the optimizer's step through :meth:`fastclu.optim.SGD.set_anchor` (gradient
``lam * Omega * (theta - anchor)``).

Modes:
  * ``"separate"`` (default, the paper): one penalty per earlier task. Their sum has the
    gradient ``lam * (sum_t F_t) * (theta - a)`` with ``a = sum_t F_t theta*_t / sum_t F_t``
    (elementwise; ``a = theta*_t`` of the latest task where every ``F`` is 0), so it is passed
    exactly as one importance and one anchor.
  * ``"online"`` (Schwarz et al. 2018, online EWC): ``Omega = gamma * Omega + F_t``, anchored at
    the latest ``theta*_t``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from fastclu.losses import masked_classification_loss
from fastclu.methods.common import MethodResult, Timer, cycle, train, use_backend

__all__ = ["ewc"]

MODES = ("separate", "online")


def _per_example(loader: Iterable, n: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` examples of ``loader`` as batches of one (cycling if the task is smaller)."""
    out: list[tuple[Tensor, Tensor]] = []
    for xb, yb in cycle(loader):
        for x, y in zip(xb, yb):
            out.append((x[None], y[None]))
            if len(out) == n:
                return out
    return out  # pragma: no cover (cycle is endless)


def ewc(
    model: nn.Module,
    task_loaders: Sequence[Iterable],
    *,
    steps_per_task: int = 150,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lam: float = 100.0,
    mode: str = "separate",
    gamma: float = 1.0,
    fisher_samples: int = 128,
    task_classes: Sequence[Sequence[int]] | None = None,
    after_task: Callable[[int, nn.Module], None] | None = None,
    backend: str | None = None,
) -> MethodResult:
    """Train ``model`` on the tasks in order with EWC, in place (fastclu SGD, cosine LR per task).

    Args:
        lam: penalty strength ``lambda`` (>= 0).
        mode: ``"separate"`` (one penalty per task, the paper) or ``"online"`` (see module doc).
        gamma: online EWC's decay of the accumulated importance (``mode="online"`` only).
        fisher_samples: examples of each task whose squared per-example gradients (at the
            trained weights, model in eval mode) make its Fisher.
        task_classes: restrict each task's softmax to its classes (also in its Fisher).
        after_task: ``after_task(i, model)`` after task ``i`` (not timed).

    Returns:
        MethodResult; ``info["fisher_trace"]``: the trace of each task's Fisher.
    """
    from fastclu.optim import SGD
    from fastclu.saliency import fisher

    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
        raise ValueError(f"fisher_samples must be an int >= 1, got {fisher_samples!r}")
    if task_classes is not None and len(task_classes) != len(task_loaders):
        raise ValueError(f"task_classes has {len(task_classes)} entries for {len(task_loaders)} tasks")
    all_params = list(model.parameters())
    live = [i for i, p in enumerate(all_params) if p.requires_grad]
    params = [all_params[i] for i in live]
    omega: list[Tensor] | None = None  # sum_t F_t (separate) or the online importance
    f_theta: list[Tensor] | None = None  # sum_t F_t * theta*_t (separate mode)
    traces: list[float] = []
    wall, n = 0.0, 0
    with use_backend(backend):
        for t, ld in enumerate(task_loaders):
            loss_fn = masked_classification_loss(None if task_classes is None else task_classes[t])
            with Timer(params[0].device) as tm:
                opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
                if omega is not None and lam > 0:
                    opt.set_anchor(omega, lam, anchor=_anchor(omega, f_theta, params, mode))
                n += train(model, ld, steps_per_task, loss_fn=loss_fn, optimizer=opt)
                was_training = model.training
                model.eval()
                f_all = fisher(model, _per_example(ld, fisher_samples), loss_fn)
                model.train(was_training)
                f_t = [f_all[i] for i in live]
                if not all(bool(torch.isfinite(f).all()) for f in f_t):
                    raise FloatingPointError(f"task {t}: the Fisher has non-finite entries (training diverged?)")
                traces.append(float(sum(f.double().sum() for f in f_t)))
                omega, f_theta = _accumulate(omega, f_theta, f_t, params, mode, gamma)
            wall += tm.elapsed
            if after_task is not None:
                after_task(t, model)
    return MethodResult("EWC", wall, n, {"lam": lam, "mode": mode, "gamma": gamma, "fisher_trace": traces})


def _accumulate(
    omega: list[Tensor] | None,
    f_theta: list[Tensor] | None,
    f_t: list[Tensor],
    params: list[Tensor],
    mode: str,
    gamma: float,
) -> tuple[list[Tensor], list[Tensor] | None]:
    theta = [p.detach().to(torch.float32) for p in params]
    if mode == "online":
        if omega is None:
            return [f.clone() for f in f_t], None
        torch._foreach_mul_(omega, gamma)
        torch._foreach_add_(omega, f_t)
        return omega, None
    if omega is None:
        return [f.clone() for f in f_t], torch._foreach_mul(f_t, theta)
    torch._foreach_add_(omega, f_t)
    torch._foreach_addcmul_(f_theta, f_t, theta)
    return omega, f_theta


def _anchor(omega: list[Tensor], f_theta: list[Tensor] | None, params: list[Tensor], mode: str) -> list[Tensor]:
    """The single anchor whose penalty gradient equals the sum of the per-task ones."""
    here = [p.detach().to(torch.float32) for p in params]
    if mode == "online":
        return here
    out = []
    for o, ft, h in zip(omega, f_theta, here):
        # Where no task has curvature the anchor is irrelevant (Omega = 0): keep the weights.
        out.append(torch.where(o > 0, ft / o.clamp_min(torch.finfo(o.dtype).tiny), h))
    return out
