"""Benchmark cases of ``combine_step_``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch

from fastclu import ops
from fastclu.bench.cases._common import (
    ADAM_EPS,
    ADAM_LR,
    ADAM_WD,
    BETAS,
    LR,
    MOMENTUM,
    WD,
    Case,
    Data,
    Step,
    _adamw_peer,
    _compiled,
    _loop_and_compile,
    _masks,
    _rand_pos,
    _randn,
    _sgd_peer,
    _with_shapes,
)


def _make_sgd(shapes, dtype, device) -> Data:
    return {
        "params": _randn(shapes, dtype, device),
        "grads": _randn(shapes, dtype, device, 1e-2),
        "buf": _randn(shapes, torch.float32, device, 1e-2),
    }


def _make_sgd_masked(shapes, dtype, device) -> Data:
    d = _make_sgd(shapes, dtype, device)
    d["grads_remain"] = _randn(shapes, dtype, device, 1e-2)
    d["mask"], d["bool"] = _masks(shapes, device)
    return d


def _sgd_masked_loop(d: Data) -> Step:
    # SFR-on's forget step as its code writes it: mask the forget grad, combine, SGD per tensor.
    def step() -> None:
        for p, gf, gr, buf, m in zip(d["params"], d["grads"], d["grads_remain"], d["buf"], d["bool"]):
            g = -25.0 * (gf.float() * m) + gr.float()
            g = g.add(p.float(), alpha=WD)
            buf.mul_(MOMENTUM).add_(g)
            p.add_(buf.to(p.dtype), alpha=-LR)

    return step


def _sgd_masked_foreach(d: Data) -> Step:
    fmasks = [m.float() for m in d["bool"]]  # float masks kept across steps, as the papers' code does

    def step() -> None:
        gf = torch._foreach_mul([g.float() for g in d["grads"]], fmasks)
        torch._foreach_mul_(gf, -25.0)
        torch._foreach_add_(gf, [g.float() for g in d["grads_remain"]])
        torch._foreach_add_(gf, [p.float() for p in d["params"]], alpha=WD)
        torch._foreach_mul_(d["buf"], MOMENTUM)
        torch._foreach_add_(d["buf"], gf)
        torch._foreach_add_(d["params"], [b.to(p.dtype) for b, p in zip(d["buf"], d["params"])], alpha=-LR)

    return step


def _make_adamw(shapes, dtype, device) -> Data:
    return {
        "params": _randn(shapes, dtype, device),
        "grads": _randn(shapes, dtype, device, 1e-2),
        "exp_avg": _randn(shapes, torch.float32, device, 1e-3),
        "exp_avg_sq": _rand_pos(shapes, torch.float32, device),
        "step": [torch.ones((), dtype=torch.float32, device=device) for _ in shapes],
    }


# The SFR-on-style unlearning step on AdamW: forget role masked and weighted, remain role live, clip
# on the global norm of the combination (clip small enough to be active at every size).
COEF_FORGET, CLIP = -1.0, 0.1


def _make_adamw_2role(shapes, dtype, device) -> Data:
    d = {"params": _randn(shapes, dtype, device), "grads": _randn(shapes, dtype, device, 1e-2),
         "grads_forget": _randn(shapes, dtype, device, 1e-2)}  # fmt: skip
    d["mask"], d["bool"] = _masks(shapes, device)
    return d


def _adamw_2role_fastclu(d: Data, backend: str) -> Step:
    """``fastclu.optim.AdamW`` end to end: ``set_mask`` (mode ``grad``, forget role only), stash the
    forget role, ``step(combine={"forget": COEF_FORGET, "grad": 1.0}, clip=CLIP)`` (gram + combine)."""
    from fastclu.optim import AdamW

    params = [p.requires_grad_(True) for p in d["params"]]
    opt = AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, backend=backend)
    opt.set_mask(d["mask"], mode="grad", roles=["forget"])

    def step() -> None:
        for p, g in zip(params, d["grads_forget"]):
            p.grad = g
        opt.stash("forget")
        for p, g in zip(params, d["grads"]):
            p.grad = g
        opt.step(combine={"forget": COEF_FORGET, "grad": 1.0}, clip=CLIP)

    return step


def _adamw_2role_torch(kind: str):
    """The same step as the papers' code writes it on ``torch.optim.AdamW`` (``loop``:
    ``foreach=False`` and per-tensor ops; ``foreach``: ``torch._foreach_*`` and ``foreach=True``):
    float masks multiplied into the forget grads, the combination written to ``.grad``,
    ``clip_grad_norm_``, the optimizer step."""
    foreach = kind == "foreach"

    def build(d: Data) -> Step:
        params = [p.requires_grad_(True) for p in d["params"]]
        fmasks = [m.to(p.dtype) for m, p in zip(d["bool"], params)]  # kept across steps, as the papers' code does
        opt = torch.optim.AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, foreach=foreach)

        def step() -> None:
            with torch.no_grad():
                if foreach:
                    gs = torch._foreach_mul(d["grads_forget"], fmasks)
                    torch._foreach_mul_(gs, COEF_FORGET)
                    torch._foreach_add_(gs, d["grads"])
                else:
                    gs = [
                        (gf * m).mul_(COEF_FORGET).add_(gr) for gf, m, gr in zip(d["grads_forget"], fmasks, d["grads"])
                    ]
            for p, g in zip(params, gs):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=foreach)
            opt.step()

        return step

    return build


CASES: list[Case] = [
    Case(
        "combine_step_sgd", "combine_step_", _with_shapes(_make_sgd),
        lambda d, b: lambda: ops.combine_step_(
            d["params"], [d["grads"]], {"momentum_buffer": d["buf"]}, rule="sgd", lr=LR,
            momentum=MOMENTUM, weight_decay=WD, backend=b,
        ),
        {"loop": _sgd_peer("loop"), "foreach": _sgd_peer("foreach"), "compile": _compiled(_sgd_peer("foreach")),
         "torch_fused": _sgd_peer("fused")},
        "plain SGD (momentum, wd): the math of torch.optim.SGD",
    ),
    Case(
        "combine_step_sgd_masked", "combine_step_", _with_shapes(_make_sgd_masked),
        lambda d, b: lambda: ops.combine_step_(
            d["params"], [d["grads"], d["grads_remain"]], {"momentum_buffer": d["buf"]}, rule="sgd", lr=LR,
            coeffs=[-25.0, 1.0], mask=d["mask"], masked=[True, False], momentum=MOMENTUM, weight_decay=WD,
            backend=b,
        ),
        _loop_and_compile(_sgd_masked_loop, _sgd_masked_foreach),
        "SFR-on/UG-CLU: masked forget + remain grads, SGD",
    ),
    Case(
        "combine_step_adamw", "combine_step_", _with_shapes(_make_adamw),
        lambda d, b: lambda: ops.combine_step_(
            d["params"], [d["grads"]],
            {"exp_avg": d["exp_avg"], "exp_avg_sq": d["exp_avg_sq"], "step": d["step"]},
            rule="adamw", lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, backend=b,
        ),
        {"loop": _adamw_peer("loop"), "foreach": _adamw_peer("foreach"),
         "compile": _compiled(_adamw_peer("foreach")), "torch_fused": _adamw_peer("fused")},
        "plain AdamW: the math of torch.optim.AdamW",
    ),
    Case(
        "combine_step_adamw_masked_clipped", "combine_step_", _with_shapes(_make_adamw_2role), _adamw_2role_fastclu,
        {"loop": _adamw_2role_torch("loop"), "foreach": _adamw_2role_torch("foreach"),
         "torch_fused": _adamw_peer("fused")},
        "SFR-on on AdamW, optimizer step end to end: masked forget + remain grads, clipped (gram + combine); "
        "torch_fused is plain fused AdamW (DESIGN §5's baseline), not the same math",
    ),
]  # fmt: skip
