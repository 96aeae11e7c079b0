"""End-to-end steps: SFR-on forget iteration on a ResNet-18, a P&M step on the GPT-2 parameter list."""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fastclu.bench.cases._common import ADAM_EPS, ADAM_LR, ADAM_WD, BETAS, MOMENTUM, WD, _leaf_params
from fastclu.bench.runner import Config, _usable_backends
from fastclu.bench.shapes import gpt2_shapes
from fastclu.bench.timer import Step, _peak_extra, time_fn
from fastclu.ops.bits import pack_bits


class _Block(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(torch.nn.Module):
    """ResNet-18, CIFAR stem (3x3 conv, no max-pool), as SFR-on trains it; parameter shapes are
    :func:`resnet18_shapes` with ``stem="cifar"``."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                blocks.append(_Block(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _adaptive_forget_loss(logits: Tensor, y: Tensor, lam: float = 0.5) -> Tensor:
    """SFR-on's adaptively weighted forget loss: w_i proportional to 1 / (stopgrad(l_i)^lam + 1e-15)."""
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    c = 1.0 / (per.detach().clamp_min(0) ** lam + 1e-15)
    return (c / c.sum() * per).sum()


SFR_LR, SFR_ALPHA, SFR_CLIP = 0.01, 25.0, 7.0
PM_EPS = 0.5


def sfr_on_fastclu_step(params: list[Tensor], masks: list[Tensor], backend: str) -> Step:
    """SFR-on's forget update with fastclu: ``fastclu.optim.SGD`` + ``set_mask`` (mode ``grad``) +
    ``step(combine={"grad": -alpha_f}, clip=7)``. ``masks``: bool, shaped like ``params``."""
    from fastclu.optim import SGD

    opt = SGD(params, lr=SFR_LR, momentum=MOMENTUM, weight_decay=WD, backend=backend)
    opt.set_mask([pack_bits(m) for m in masks], mode="grad")
    return lambda: opt.step(combine={"grad": -SFR_ALPHA}, clip=SFR_CLIP)


def sfr_on_torch_step(params: list[Tensor], masks: list[Tensor]) -> Step:
    """The same update as SFR-on's code writes it: float masks multiplied into each ``.grad``, the
    coefficient, ``clip_grad_norm_``, ``torch.optim.SGD(foreach=False).step()``."""
    fmasks = [m.to(p.dtype) for m, p in zip(masks, params)]
    opt = torch.optim.SGD(params, lr=SFR_LR, momentum=MOMENTUM, weight_decay=WD, foreach=False)

    def step() -> None:
        with torch.no_grad():
            for p, m in zip(params, fmasks):
                p.grad.mul_(m).mul_(-SFR_ALPHA)
        torch.nn.utils.clip_grad_norm_(params, SFR_CLIP, foreach=False)
        opt.step()

    return step


def _adamw_folds() -> bool:
    """Whether fastclu.optim.AdamW.step takes ``restore_from`` (the folded restore saves a pass)."""
    try:
        from fastclu.optim import AdamW
    except ImportError:
        return False
    return "restore_from" in inspect.signature(AdamW.step).parameters


def pm_fastclu_step(params: list[Tensor], backend: str) -> Step:
    """A P&M step with ``PerturbMerge(fastclu.optim.AdamW)`` (k = +1 always), after a first task
    (theta_prev = the current weights) and one step, so the task vector is nonzero. The model's
    forward/backward is not run: ``.grad`` stays as given."""
    from fastclu.optim import AdamW
    from fastclu.optim.perturb_merge import PerturbMerge

    opt = PerturbMerge(AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, backend=backend),
                       eps=PM_EPS, probs=(0.0, 1.0, 0.0), fold_restore=_adamw_folds(), backend=backend)  # fmt: skip
    opt.accumulate_fisher()
    opt.end_task()
    with opt.perturbed():  # PerturbMerge refuses a step whose gradients were taken outside the window
        pass
    opt.step()

    def step() -> None:
        with opt.perturbed():
            pass  # forward/backward at the perturbed weights would run here
        opt.accumulate_fisher()
        opt.step()

    return step


def pm_torch_step(params: list[Tensor]) -> Step:
    """The same P&M step written as Python loops around ``torch.optim.AdamW(foreach=False)``, after
    the same setup (theta_prev = the current weights, one step)."""
    anchor = [p.detach().clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    fisher = [torch.zeros_like(p) for p in params]
    opt = torch.optim.AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, foreach=False)
    opt.step()

    def step() -> None:
        with torch.no_grad():
            for p, a, b in zip(params, anchor, backup):
                b.copy_(p)
                p.add_(p - a, alpha=PM_EPS)
            # forward/backward at the perturbed weights would run here
            for p, b in zip(params, backup):
                p.copy_(b)
            for f, p in zip(fisher, params):
                f.addcmul_(p.grad, p.grad)
        opt.step()

    return step


def e2e_sfr_on(cfg: Config, backends: Sequence[str]) -> list[dict[str, Any]]:
    """One SFR-on forget iteration on a ResNet-18: adaptive forget loss forward/backward, then the
    masked (mode ``grad``) ascent step with alpha_f = 25, global-norm clip 7 of the masked, weighted
    gradient, SGD lr 0.01, momentum 0.9, wd 5e-4 (:func:`sfr_on_fastclu_step` vs
    :func:`sfr_on_torch_step`)."""
    dev = cfg.device
    width, batch, res = (4, 2, 8) if cfg.tiny else (64, 128, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    label = f"ResNet-18 CIFAR (width {width}, batch {batch}x3x{res}x{res})"

    def fwd_bwd(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=False)
        _adaptive_forget_loss(model(x), y).backward()

    def side(backend: str | None) -> Callable[[], tuple[torch.nn.Module, Step, list[Tensor]]]:
        def build() -> tuple[torch.nn.Module, Step, list[Tensor]]:
            model = ResNet18(10, width).to(dev)
            params = list(model.parameters())
            masks = [torch.rand(p.shape, device=dev) < 0.5 for p in params]
            fwd_bwd(model)  # .grad exists before the optimizer is built, as after a first backward
            step = sfr_on_torch_step(params, masks) if backend is None else sfr_on_fastclu_step(params, masks, backend)
            return model, step, params

        return build

    rows = [_e2e_row("sfr_on_forget_iter", f"fastclu.optim.SGD[{b}]", side(b), fwd_bwd, cfg, label) for b in backends]
    rows.append(_e2e_row("sfr_on_forget_iter", "torch.optim.SGD(loop)", side(None), fwd_bwd, cfg, label))
    return rows


def e2e_pm(cfg: Config, backends: Sequence[str]) -> list[dict[str, Any]]:
    """One P&M training step on a GPT-2-124M parameter list, optimizer side only (the model's
    forward/backward is not run: the gradients are fixed random tensors): backup, perturb
    theta += eps (theta - theta_prev), restore, F += g^2, AdamW (:func:`pm_fastclu_step` vs
    :func:`pm_torch_step`)."""
    dev = cfg.device
    shapes = gpt2_shapes(vocab=1000, ctx=64, dim=64, depth=2) if cfg.tiny else gpt2_shapes()
    numel = sum(math.prod(s) for s in shapes)
    label = f"GPT-2 parameter list ({numel:,} fp32 params, {len(shapes)} tensors), no forward/backward"

    def side(backend: str | None) -> Callable[[], tuple[None, Step, list[Tensor]]]:
        def build() -> tuple[None, Step, list[Tensor]]:
            params = _leaf_params(shapes, torch.float32, dev)
            return None, (pm_torch_step(params) if backend is None else pm_fastclu_step(params, backend)), params

        return build

    fold = ", fold" if _adamw_folds() else ""
    rows = [_e2e_row("pm_step", f"fastclu PerturbMerge(AdamW{fold})[{b}]", side(b), None, cfg, label) for b in backends]
    rows.append(_e2e_row("pm_step", "torch.optim.AdamW(loop)", side(None), None, cfg, label))
    return rows


def _e2e_row(
    name: str,
    impl: str,
    build: Callable[[], tuple[Any, Step, list[Tensor]]],
    fwd_bwd: Callable | None,
    cfg: Config,
    label: str,
) -> dict[str, Any]:
    r: dict[str, Any] = {"name": name, "impl": impl, "model": label, "iteration_s": None, "optimizer_s": None,
                         "peak_extra_bytes": None, "error": None}  # fmt: skip
    try:
        model, opt_step, _ = build()
        if model is not None and fwd_bwd is not None:

            def full() -> None:
                fwd_bwd(model)
                opt_step()

            r["iteration_s"] = statistics.median(time_fn(full, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats))
        r["optimizer_s"] = statistics.median(time_fn(opt_step, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats))
        r["peak_extra_bytes"] = _peak_extra(opt_step, cfg.device)
    except Exception as e:  # noqa: BLE001 -- the other side of the comparison still gets reported
        r["error"] = f"{type(e).__name__}: {e}"[:500]
    return r


def run_e2e(cfg: Config, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Both end-to-end benchmarks, for every usable fastclu backend and the torch.optim version,
    with each fastclu row's speed-up over torch.optim (torch time / fastclu time)."""
    use, _ = _usable_backends(cfg.backends, cfg.device)
    rows = []
    for fn in (e2e_sfr_on, e2e_pm):
        pair = fn(cfg, use)
        ref = next((r for r in pair if r["impl"].startswith("torch")), None)
        for r in pair:
            if ref is not None and r is not ref and not r["error"] and not ref["error"]:
                for key in ("iteration_s", "optimizer_s"):
                    if r[key] and ref[key]:
                        r[f"speedup_{key[:-2]}"] = ref[key] / r[key]
            it = f"{r['iteration_s'] * 1e3:9.3f} ms/iter" if r.get("iteration_s") else ""
            op = f"{r['optimizer_s'] * 1e3:9.3f} ms optimizer" if r.get("optimizer_s") else ""
            log(f"e2e {r['name']:20s} {r['impl']:40s} {it} {op} {('error: ' + r['error']) if r['error'] else ''}")
        rows += pair
    return rows
