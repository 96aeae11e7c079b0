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

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from fastclu.methods.common import MethodResult, Timer, cosine, cycle, task_loss, use_backend

__all__ = ["perturb_and_merge"]


def perturb_and_merge(
    model: nn.Module,
    task_loaders: Sequence[Iterable],
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
    backend: str | None = None,
) -> MethodResult:
    """Train ``model`` on the tasks in order with P&M, in place.

    Args:
        task_loaders: one loader of ``(x, y)`` batches per task.
        steps_per_task: SGD steps per task (cosine learning rate within each task; momentum
            is reset per task, as each task starts from the merged model).
        eps, probs: P&M's perturbation size and the probabilities of ``k = 0, +1, -1``.
        fisher_samples: examples of the task, at the trained (unperturbed) weights, whose
            squared per-example gradients estimate its diagonal (empirical) Fisher before the
            merge. Per-example, not per-batch: near an optimum a batch-mean gradient averages
            out and would understate the curvature.
        seed: seed of the perturbation draws.
        task_classes: restrict each task's softmax to its classes (as in naive_sequential).
        head: parameters of ``model`` (typically the classifier) that are trained like the rest
            but neither perturbed, nor in the Fisher, nor merged: they keep their trained values.
            This is the paper's setting, where P&M perturbs and merges the backbone's task
            vector (LoRA) and each task's classifier head is trained for that task alone. None:
            every parameter is perturbed and merged.
        normalize_fisher: enter each task's Fisher scaled to unit trace instead of its mean
            (:meth:`~fastclu.optim.PerturbMerge.end_task`). Not in the paper (default off): the
            empirical Fisher at an optimum scales with the squared loss there, so tasks fit to
            different loss levels weigh differently by orders of magnitude in ``alpha``.
        after_task: called as ``after_task(i, model)`` after task ``i`` is merged (not timed).

    Returns:
        MethodResult; ``info["alpha"]`` lists the merge coefficients (None for the first task),
        ``info["fisher_trace"]`` the trace of each task's mean Fisher (before any normalisation)
        and ``info["fit_loss"]`` each task's mean loss over the Fisher examples at its trained
        weights (the two numbers that explain an ``alpha`` near 0 or 1).
    """
    from fastclu.optim import SGD, PerturbMerge

    if isinstance(steps_per_task, bool) or not isinstance(steps_per_task, int) or steps_per_task < 0:
        raise ValueError(f"steps_per_task must be an int >= 0, got {steps_per_task!r}")
    if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
        raise ValueError(f"fisher_samples must be an int >= 1, got {fisher_samples!r}")
    if task_classes is not None and len(task_classes) != len(task_loaders):
        raise ValueError(f"task_classes has {len(task_classes)} entries for {len(task_loaders)} tasks")
    if not isinstance(normalize_fisher, bool):
        raise TypeError(f"normalize_fisher must be a bool, got {type(normalize_fisher).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_ids = _check_head(head, trainable)
    body = [p for p in trainable if id(p) not in head_ids]
    head_ps = [p for p in trainable if id(p) in head_ids]
    if not body:
        raise ValueError("head holds every trainable parameter of model: nothing is left to perturb and merge")
    dev = body[0].device
    alphas: list[float | None] = []
    traces: list[float] = []
    fit: list[float] = []
    wall, n = 0.0, 0
    with use_backend(backend):
        pm = None
        for i, ld in enumerate(task_loaders):
            loss_fn = task_loss(None if task_classes is None else task_classes[i])
            with Timer(dev) as tm:
                inner = SGD(body, lr=lr, momentum=momentum, weight_decay=weight_decay)
                opts: list[torch.optim.Optimizer] = [inner]
                if head_ps:
                    opts.append(SGD(head_ps, lr=lr, momentum=momentum, weight_decay=weight_decay))
                if pm is None:
                    pm = PerturbMerge(inner, eps=eps, probs=probs, seed=seed, backend=backend)
                else:
                    # A fresh inner optimizer per task, same P&M state (anchors and Fisher sums).
                    pm.optimizer = inner
                scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: cosine(t, steps_per_task)) for o in opts]
                model.train()
                it = cycle(ld)
                for _ in range(steps_per_task):
                    x, y = next(it)
                    x, y = x.to(dev), y.to(dev)
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    with pm.perturbed():
                        loss_fn(model(x), y).backward()
                    pm.step()
                    for o in opts[1:]:
                        o.step()
                    for sc in scheds:
                        sc.step()
                    n += 1
                # The merge needs the Fisher at the task's optimum, not at perturbed points.
                seen = 0
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                it = cycle(ld)
                while seen < fisher_samples:
                    xb, yb = next(it)
                    for x, y in zip(xb[: fisher_samples - seen], yb[: fisher_samples - seen]):
                        for o in opts:
                            o.zero_grad(set_to_none=True)
                        loss = loss_fn(model(x[None].to(dev)), y[None].to(dev))
                        loss.backward()
                        loss_sum += loss.detach().double()
                        pm.accumulate_fisher()
                        seen += 1
                for o in opts:
                    o.zero_grad(set_to_none=True)
                traces.append(float(pm.fisher_trace()))
                fit.append(float(loss_sum) / fisher_samples)
                a = pm.end_task(normalize=normalize_fisher)
                alphas.append(None if a is None else float(a.detach()))
            wall += tm.elapsed
            if after_task is not None:
                after_task(i, model)
    info = {"alpha": alphas, "eps": eps, "fisher_trace": traces, "fit_loss": fit,
            "normalize_fisher": normalize_fisher, "head_params": len(head_ps)}  # fmt: skip
    return MethodResult("P&M", wall, n, info)


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
