"""Perturb-and-Merge with LoRA (the P&M paper's setting): a fresh adapter per task.

For task ``t`` every LoRA layer starts from a fresh adapter (``B = 0``) on its base weight
``W`` (the merge of the earlier tasks) and trains ``A``, ``B`` (and any other trainable
parameter, e.g. a classifier head, which is not merged) at ``W + (1 + k*eps) * s*B@A`` with
``k`` in {0, +1, -1} drawn per step with ``probs`` (the adapter's scaling is multiplied by
``1 + k*eps`` for the forward/backward and restored exactly). After the task, with the task
vector ``Delta = s*B@A`` and the task optimum ``theta*_t = W + Delta``:

    F_t    = mean over fisher_samples examples of (dL/dW_merged)**2      (weight-space Fisher)
    S_F   += F_t;   S_Ftheta += F_t * theta*_t                            (over tasks 1..t)
    alpha  = clamp(sum Delta * (S_Ftheta - W * S_F) / sum Delta**2 * S_F, 0, 1)   (DESIGN §1)
    W     += alpha * Delta, then a fresh adapter

``dL/dW_merged`` is the gradient with respect to the base weight (the merged weight's
gradient: ``W`` and ``W + s*B@A`` enter the forward identically), taken with
``torch.autograd.grad`` at the trained weights. For the first task ``alpha = 1`` up to
rounding (the formula with one task). The sums use :func:`fastclu.ops.merge_stats`, the
merge :func:`fastclu.ops.merge_`, the Fisher :func:`fastclu.ops.fisher_accumulate_`.

A non-finite Fisher, task vector or ``alpha`` (or a zero denominator) raises
``FloatingPointError`` naming the task before the base weights change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fastclu import ops
from fastclu.lora import LoRAPair, find_lora_layers
from fastclu.methods.common import MethodResult, Timer, cosine, cycle, task_loss, use_backend

__all__ = ["fresh_adapters_", "pnm_lora"]


def fresh_adapters_(pairs: Sequence[LoRAPair], seed: int) -> None:
    """Re-initialise every adapter (``A`` Kaiming-uniform, ``B = 0``) deterministically from ``seed``."""
    for j, p in enumerate(pairs):
        if p.adapter is None:
            p.module.reset_adapter(seed * 1009 + j)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1009 + j)
                p.module.reset_lora_parameters(p.adapter, True)


@contextlib.contextmanager
def _scaled(pairs: Sequence[LoRAPair], factor: float) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for p in pairs:
            stack.enter_context(p.scaled(factor))
        yield


def weight_fisher(
    model: nn.Module, pairs: Sequence[LoRAPair], loader: Iterable, loss_fn: Callable, n: int
) -> tuple[list[Tensor], float]:
    """Mean squared per-example gradient w.r.t. each base (merged) weight over ``n`` examples, and the mean loss."""
    ws = [p.weight for p in pairs]
    fis = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in ws]
    flags = [w.requires_grad for w in ws]
    seen, loss_sum = 0, 0.0
    try:
        for w in ws:
            w.requires_grad_(True)
        it = cycle(loader)
        while seen < n:
            xb, yb = next(it)
            for x, y in zip(xb[: n - seen], yb[: n - seen]):
                dev = ws[0].device
                loss = loss_fn(model(x[None].to(dev)), y[None].to(dev))
                gs = torch.autograd.grad(loss, ws, allow_unused=True)
                gs = [torch.zeros_like(w) if g is None else g for g, w in zip(gs, ws)]
                ops.fisher_accumulate_(fis, [g.contiguous() for g in gs], 1.0 / n)
                loss_sum += float(loss.detach())
                seen += 1
    finally:
        for w, f in zip(ws, flags):
            w.requires_grad_(f)
    return fis, loss_sum / n


def merge_task_(
    pairs: Sequence[LoRAPair],
    fisher_t: list[Tensor],
    sums: dict[str, list[Tensor]],
    task: int,
    fixed_alpha: float | None = None,
) -> float:
    """Enter task ``task``'s Fisher into ``sums``, compute ``alpha`` and merge ``W += alpha * Delta``.

    ``sums`` holds ``"F"`` and ``"Ftheta"`` (fp32, one per pair; empty lists before the first
    task). ``fixed_alpha``: merge with this coefficient instead (the sums are still kept).
    Validates everything before ``W`` or ``sums`` change; returns ``alpha``.
    """
    ws = [p.weight for p in pairs]
    deltas = [p.delta(torch.float32) for p in pairs]
    for name, xs in (("Fisher", fisher_t), ("task vector s*B@A", deltas), ("base weight", ws)):
        if not all(bool(torch.isfinite(x).all()) for x in xs):
            raise FloatingPointError(f"task {task}: the {name} has non-finite entries; weights left unchanged")
    w32 = [w.detach().to(torch.float32) for w in ws]
    opt_t = torch._foreach_add(w32, deltas)  # theta*_t, fp32
    if sums["F"]:
        s_f = torch._foreach_add(sums["F"], fisher_t)
        s_ft = torch._foreach_addcmul(sums["Ftheta"], fisher_t, opt_t)
    else:
        s_f = [f.clone() for f in fisher_t]
        s_ft = torch._foreach_mul(fisher_t, opt_t)
    num, den = ops.merge_stats(opt_t, w32, s_f, s_ft)
    num, den = float(num), float(den)
    alpha = num / den if den > 0 else float("nan")
    if not (den > 0 and math.isfinite(alpha)):
        raise FloatingPointError(
            f"task {task}: alpha = {num!r} / {den!r} is not a finite number; weights left unchanged"
        )
    alpha = min(max(alpha, 0.0), 1.0) if fixed_alpha is None else float(fixed_alpha)
    ops.merge_(opt_t, w32, alpha)  # theta*_t <- W + alpha * Delta
    with torch.no_grad():
        for w, m in zip(ws, opt_t):
            w.copy_(m)
    sums["F"], sums["Ftheta"] = s_f, s_ft
    return alpha


def pnm_lora(
    model: nn.Module,
    task_loaders: Sequence[Iterable],
    *,
    steps_per_task: int = 150,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 0.5,
    probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    fisher_samples: int = 128,
    seed: int = 0,
    task_classes: Sequence[Sequence[int]] | None = None,
    perturb: bool = True,
    merge: str = "fisher",
    after_task: Callable[[int, nn.Module], None] | None = None,
    backend: str | None = None,
) -> MethodResult:
    """Train ``model`` (with LoRA layers) on the tasks in order with P&M-LoRA, in place.

    Args:
        model: a module with LoRA layers (:func:`fastclu.lora.find_lora_layers`); its other
            trainable parameters (e.g. the head) are trained with the adapters and not merged.
        steps_per_task: fastclu SGD steps per task (cosine LR per task, fresh momentum).
        eps, probs: P&M's perturbation size and the probabilities of ``k = 0, +1, -1``.
        fisher_samples: examples per task for the weight-space Fisher.
        seed: seed of the ``k`` draws and of the fresh adapters.
        task_classes: restrict each task's softmax to its classes (also in the Fisher).
        perturb: False trains at ``W + s*B@A`` (no P&M perturbation; the merge stays): the
            ablation "LoRA + merge".
        merge: ``"fisher"`` (the closed-form alpha) or ``"sum"`` (alpha = 1: each task's
            adapter added to the base, i.e. plain sequential LoRA; with ``perturb=False`` the
            naive baseline).
        after_task: ``after_task(i, model)`` after task ``i`` is merged (not timed).

    Returns:
        MethodResult; ``info["alpha"]``, ``info["fisher_trace"]``, ``info["fit_loss"]`` per task.
    """
    from fastclu.optim import SGD

    if isinstance(steps_per_task, bool) or not isinstance(steps_per_task, int) or steps_per_task < 0:
        raise ValueError(f"steps_per_task must be an int >= 0, got {steps_per_task!r}")
    if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
        raise ValueError(f"fisher_samples must be an int >= 1, got {fisher_samples!r}")
    if len(probs) != 3 or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"probs must be three probabilities summing to 1, got {probs!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if task_classes is not None and len(task_classes) != len(task_loaders):
        raise ValueError(f"task_classes has {len(task_classes)} entries for {len(task_loaders)} tasks")
    if merge not in ("fisher", "sum"):
        raise ValueError(f"merge must be 'fisher' or 'sum', got {merge!r}")
    pairs = find_lora_layers(model)
    sums: dict[str, list[Tensor]] = {"F": [], "Ftheta": []}
    alphas, traces, fit = [], [], []
    ks = torch.tensor([0.0, 1.0, -1.0])
    gen = torch.Generator().manual_seed(seed)
    wall, n = 0.0, 0
    with use_backend(backend):
        for t, ld in enumerate(task_loaders):
            loss_fn = task_loss(None if task_classes is None else task_classes[t])
            with Timer(pairs[0].weight.device) as tm:
                fresh_adapters_(pairs, seed + 7919 * (t + 1))
                trainable = [p for p in model.parameters() if p.requires_grad]
                opt = SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: cosine(i, steps_per_task))
                draws = torch.multinomial(torch.tensor(probs), max(steps_per_task, 1), True, generator=gen)
                model.train()
                it = cycle(ld)
                dev = pairs[0].weight.device
                for i in range(steps_per_task):
                    x, y = next(it)
                    opt.zero_grad(set_to_none=True)
                    factor = 1.0 + float(ks[draws[i]]) * eps if perturb else 1.0
                    with _scaled(pairs, factor):
                        loss_fn(model(x.to(dev)), y.to(dev)).backward()
                    opt.step()
                    sched.step()
                    n += 1
                opt.zero_grad(set_to_none=True)
                fis, fl = weight_fisher(model, pairs, ld, loss_fn, fisher_samples)
                traces.append(float(sum(f.double().sum() for f in fis)))
                fit.append(fl)
                alphas.append(merge_task_(pairs, fis, sums, t, None if merge == "fisher" else 1.0))
                fresh_adapters_(pairs, seed + 7919 * (t + 1) + 1)  # the merged delta leaves the adapter
            wall += tm.elapsed
            if after_task is not None:
                after_task(t, model)
    info = {"alpha": alphas, "eps": eps, "perturb": perturb, "merge": merge, "fisher_trace": traces, "fit_loss": fit,
            "lora_layers": len(pairs)}  # fmt: skip
    name = {(True, "fisher"): "P&M-LoRA", (False, "fisher"): "LoRA+merge", (False, "sum"): "LoRA"}
    return MethodResult(name.get((perturb, merge), "LoRA+perturb"), wall, n, info)
