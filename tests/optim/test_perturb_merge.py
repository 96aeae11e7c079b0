"""PerturbMerge: perturbation along the task vector, exact restore, Fisher sums and closed-form merge."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from fastclu.optim.perturb_merge import PerturbMerge


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64).to(dtype)),
            torch.nn.Parameter(torch.randn(5, dtype=torch.float64).to(dtype))]  # fmt: skip


def _tasks(n_tasks: int = 3, steps: int = 6):
    """Per task, a list of (x, y) batches of a linear regression with a task-specific target."""
    out = []
    for _ in range(n_tasks):
        w_true = torch.randn(5, 4, dtype=torch.float64)
        batch = []
        for _ in range(steps):
            x = torch.randn(8, 4, dtype=torch.float64)
            batch.append((x, x @ w_true.T + 0.1 * torch.randn(8, 5, dtype=torch.float64)))
        out.append(batch)
    return out


def _loss(ps, x, y):
    w, b = ps
    return ((x.to(w.dtype) @ w.T + b - y.to(w.dtype)) ** 2).mean()


def _train_task(opt: PerturbMerge, ps, batches, fisher: bool = True) -> None:
    for x, y in batches:
        opt.zero_grad()
        with opt.perturbed():
            _loss(ps, x, y).backward()
        if fisher:
            opt.accumulate_fisher()
        opt.step()


def _clone(ps):
    return [p.detach().clone() for p in ps]


def test_probs_100_equals_plain_training() -> None:
    tasks = _tasks(2)
    ps = _params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = PerturbMerge(torch.optim.SGD(ps, lr=0.05, momentum=0.9), eps=0.5, probs=(1, 0, 0), seed=3)
    _train_task(opt, ps, tasks[0])
    opt.end_task()  # first task: records theta, no merge
    plain = torch.optim.SGD(ref, lr=0.05, momentum=0.9)
    for x, y in tasks[0]:
        plain.zero_grad()
        _loss(ref, x, y).backward()
        plain.step()
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ps, ref))
    for x, y in tasks[1]:
        plain.zero_grad()
        _loss(ref, x, y).backward()
        plain.step()
    _train_task(opt, ps, tasks[1])
    assert opt.draws == len(tasks[1]) and opt.last_k == 0
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ps, ref))


def test_probs_010_equals_training_at_shifted_point() -> None:
    tasks = _tasks(2)
    ps = _params(torch.float64)
    eps, lr = 0.5, 0.05
    opt = PerturbMerge(torch.optim.SGD(ps, lr=lr), eps=eps, probs=(0, 1, 0))
    _train_task(opt, ps, tasks[0])
    opt.end_task()
    anchor = _clone(ps)
    # Independent formulation: the gradient at theta + eps (theta - anchor), applied to theta.
    theta = _clone(ps)
    for x, y in tasks[1]:
        shifted = [(t + eps * (t - a)).requires_grad_() for t, a in zip(theta, anchor)]
        g = torch.autograd.grad(_loss(shifted, x, y), shifted)
        theta = [t - lr * gi for t, gi in zip(theta, g)]
    _train_task(opt, ps, tasks[1])
    assert opt.last_k == 1
    for p, t in zip(ps, theta):
        torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("raise_in_body", [False, True])
def test_restore_bit_exact(dtype: torch.dtype, raise_in_body: bool) -> None:
    ps = _params(dtype)
    opt = PerturbMerge(torch.optim.SGD(ps, lr=0.1), eps=0.5, probs=(0, 0.5, 0.5), seed=11)
    anchor = _clone(ps)
    opt.accumulate_fisher()  # no grads yet: counts a batch, adds nothing
    opt.end_task()
    with torch.no_grad():
        for p in ps:
            p.add_(torch.randn_like(p))  # "training" moved theta away from the anchor
    clean = _clone(ps)
    batches = [(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)) for _ in range(4)]
    global_rng = torch.get_rng_state()
    for x, y in batches:
        try:
            with opt.perturbed() as k:
                assert k in (1, -1)
                for p, c, a in zip(ps, clean, anchor):
                    want = (c.float() + k * 0.5 * (c.float() - a.float())).to(dtype)
                    assert torch.equal(p.detach(), want)
                loss = _loss(ps, x, y)
                if raise_in_body:
                    raise FloatingPointError("loss blew up")
                loss.backward()
        except FloatingPointError:
            assert raise_in_body
        for p, c in zip(ps, clean):
            assert torch.equal(p.detach(), c)  # bit for bit
    assert torch.equal(torch.get_rng_state(), global_rng)  # the private generator drew k


def test_first_task_has_no_perturbation_and_no_draw() -> None:
    ps = _params()
    opt = PerturbMerge(torch.optim.SGD(ps, lr=0.1), probs=(0, 1, 0))
    clean = _clone(ps)
    with opt.perturbed() as k:
        assert k == 0
        assert all(torch.equal(p.detach(), c) for p, c in zip(ps, clean))
    assert opt.draws == 0
    with pytest.warns(UserWarning, match="accumulate_fisher"):
        assert opt.end_task() is None
    assert all(torch.equal(a, c) for a, c in zip(opt.anchors(), clean))


def test_alpha_matches_direct_fp64_on_three_tasks() -> None:
    # Tasks of different lengths: each task must enter the sums with its mean Fisher.
    tasks = [batches[:n] for batches, n in zip(_tasks(3, steps=9), (4, 9, 6))]
    ps = _params()
    opt = PerturbMerge(torch.optim.SGD(ps, lr=0.05), eps=0.5, seed=5)
    fishers, optima, anchors, alphas = [], [], [], []
    for t, batches in enumerate(tasks):
        f = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
        for x, y in batches:
            opt.zero_grad()
            with opt.perturbed():
                _loss(ps, x, y).backward()
            for fi, p in zip(f, ps):
                fi += p.grad.double() ** 2
            opt.accumulate_fisher()
            opt.step()
        fishers.append([fi / len(batches) for fi in f])
        optima.append([p.detach().double() for p in ps])
        prev = None if t == 0 else anchors[-1]
        alpha = opt.end_task()
        if prev is None:
            assert alpha is None
            anchors.append(optima[-1])
            continue
        s_f = [sum(F[i] for F in fishers) for i in range(len(ps))]
        s_ft = [sum(F[i] * O[i] for F, O in zip(fishers, optima)) for i in range(len(ps))]
        num = sum(((o - a) * (sft - a * sf)).sum() for o, a, sf, sft in zip(optima[-1], prev, s_f, s_ft))
        den = sum(((o - a) ** 2 * sf).sum() for o, a, sf in zip(optima[-1], prev, s_f))
        want = float((num / den).clamp(0, 1))
        assert abs(float(alpha) - want) < 1e-5 * max(1.0, abs(want)), (t, float(alpha), want)
        merged = [a + float(alpha) * (o - a) for a, o in zip(prev, optima[-1])]
        for p, m in zip(ps, merged):
            torch.testing.assert_close(p.detach().double(), m, rtol=1e-5, atol=1e-6)
        anchors.append([p.detach().double() for p in ps])
        alphas.append(float(alpha))
    assert opt.task == 3 and len(alphas) == 2
    assert any(0.0 < a < 1.0 for a in alphas)  # the clamp did not decide everything
    print("alphas", alphas)


def test_checkpoint_resume_bit_identical() -> None:
    tasks = _tasks(2, steps=8)
    ps = _params()
    opt = PerturbMerge(torch.optim.SGD(ps, lr=0.05, momentum=0.9), eps=0.5, seed=9)
    _train_task(opt, ps, tasks[0])
    opt.end_task()
    _train_task(opt, ps, tasks[1][:3])  # mid-task: Fisher, generator and momentum all in flight
    buf = io.BytesIO()
    torch.save({"model": _clone(ps), "opt": opt.state_dict()}, buf)
    _train_task(opt, ps, tasks[1][3:])
    alpha = opt.end_task()
    buf.seek(0)
    ck = torch.load(buf)
    ps2 = [torch.nn.Parameter(t) for t in ck["model"]]
    opt2 = PerturbMerge(torch.optim.SGD(ps2, lr=0.05, momentum=0.9), eps=0.1, seed=1234)
    opt2.load_state_dict(ck["opt"])
    assert (opt2.eps, opt2.task, opt2.fisher_count) == (0.5, 1, 3)
    _train_task(opt2, ps2, tasks[1][3:])
    alpha2 = opt2.end_task()
    assert torch.equal(alpha, alpha2)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ps, ps2))
    sd1, sd2 = opt.state_dict()["perturb_merge"], opt2.state_dict()["perturb_merge"]
    assert torch.equal(sd1["generator"], sd2["generator"])
    for i in sd1["params"]:
        for key in sd1["params"][i]:
            assert torch.equal(sd1["params"][i][key], sd2["params"][i][key])


def test_closure_step_and_scheduler() -> None:
    ps = _params()
    opt = PerturbMerge(torch.optim.SGD(ps, lr=0.1), probs=(0, 1, 0))
    with pytest.warns(UserWarning, match="accumulate_fisher"):
        opt.end_task()  # anchor = current weights: delta = 0 until the weights move
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = _loss(ps, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and opt.last_k == 1
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_guards_and_validation() -> None:
    ps = _params()
    inner = torch.optim.SGD(ps, lr=0.1)
    with pytest.raises(ValueError, match="probs"):
        PerturbMerge(inner, probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="probs"):
        PerturbMerge(inner, probs=(0, 0, 0))
    with pytest.raises(ValueError, match="probs"):
        PerturbMerge(inner, probs=(1, -1, 1))
    with pytest.raises(ValueError, match="eps"):
        PerturbMerge(inner, eps=float("nan"))
    with pytest.raises(ValueError, match="restore_from"):
        PerturbMerge(inner, fold_restore=True)
    opt = PerturbMerge(inner, probs=(2, 1, 1))
    assert opt.probs == pytest.approx((0.5, 0.25, 0.25))
    with opt.perturbed():
        with pytest.raises(RuntimeError, match="inside"):
            opt.step()
        with pytest.raises(RuntimeError, match="nest"), opt.perturbed():
            pass
        with pytest.raises(RuntimeError, match="perturbed"):
            opt.state_dict()
    with pytest.raises(ValueError, match="scale"):
        opt.accumulate_fisher(scale=-1.0)
    sd = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(sd)
    bad["perturb_merge"]["probs"] = [1, 2]
    state_before = (opt.task, opt.eps)
    with pytest.raises(ValueError, match="probs"):
        opt.load_state_dict(bad)
    assert (opt.task, opt.eps) == state_before


@pytest.mark.parametrize("inner", ["sgd", "adamw", "classp"])
def test_fold_restore_with_fastclu_optimizer(inner: str) -> None:
    import inspect

    import fastclu.optim as fo

    cls = {"sgd": fo.SGD, "adamw": fo.AdamW, "classp": fo.CLASSP}[inner]
    tasks = _tasks(2)
    ps = _params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    if "restore_from" not in inspect.signature(cls.step).parameters:
        # Without the fused restore in the inner step, folding is refused up front.
        with pytest.raises(ValueError, match="restore_from"):
            PerturbMerge(cls(ps, lr=0.05), fold_restore=True)
        return
    a = PerturbMerge(cls(ps, lr=0.05), probs=(0, 0.5, 0.5), seed=2, fold_restore=True)
    b = PerturbMerge(cls(ref, lr=0.05), probs=(0, 0.5, 0.5), seed=2)
    for opt, params in ((a, ps), (b, ref)):
        _train_task(opt, params, tasks[0])
        opt.end_task()
        _train_task(opt, params, tasks[1])
    for p, r in zip(ps, ref):
        assert torch.equal(p.detach(), r.detach())


class _FoldingSGD(torch.optim.SGD):
    """torch SGD plus the ``restore_from=`` contract of a fused step: each parameter that has a
    gradient is updated from ``restore_from[i]`` (its clean weights) instead of its own value;
    parameters without a gradient are not touched (like a skipped fused update)."""

    def step(self, closure=None, *, restore_from=None):  # type: ignore[override]
        if restore_from is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            assert len(restore_from) == len(params)
            with torch.no_grad():
                for p, src in zip(params, restore_from):
                    if p.grad is not None:
                        p.copy_(src)
        return super().step(closure)


def test_fold_restore_equals_restore_on_exit() -> None:
    tasks = _tasks(2)
    ps = _params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = PerturbMerge(_FoldingSGD(ps, lr=0.05, momentum=0.9), probs=(0, 0.5, 0.5), seed=2, fold_restore=True)
    b = PerturbMerge(torch.optim.SGD(ref, lr=0.05, momentum=0.9), probs=(0, 0.5, 0.5), seed=2)
    for opt, params in ((a, ps), (b, ref)):
        _train_task(opt, params, tasks[0])
        opt.end_task()
        _train_task(opt, params, tasks[1][:-1])
    assert all(torch.equal(p.detach(), r.detach()) for p, r in zip(ps, ref))
    # Between the block and the step the weights stay perturbed (the restore is pending) ...
    clean = _clone(ps)
    x, y = tasks[1][-1]
    a.zero_grad()
    with a.perturbed() as k:
        _loss(ps, x, y).backward()
    assert k != 0 and not torch.equal(ps[0].detach(), clean[0])
    # ... and a parameter that got no gradient is restored by the step itself.
    ps[1].grad = None
    a.step()
    assert torch.equal(ps[1].detach(), clean[1])
    assert not torch.equal(ps[0].detach(), clean[0])  # updated from the clean weights
    # A pending restore lands before a checkpoint (state_dict) is taken.
    clean = _clone(ps)
    a.zero_grad()
    with a.perturbed():
        _loss(ps, x, y).backward()
    a.state_dict()
    assert all(torch.equal(p.detach(), c) for p, c in zip(ps, clean))
    # A body that raises is restored on exit even in fold mode (no step will follow).
    for _ in range(3):
        with pytest.raises(OverflowError), a.perturbed():
            raise OverflowError
        assert all(torch.equal(p.detach(), c) for p, c in zip(ps, clean))


def test_grad_scaler_skips_wrapper_step_on_inf() -> None:
    ps = _params()
    opt = PerturbMerge(torch.optim.SGD(ps, lr=0.1), probs=(1, 0, 0))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with opt.perturbed():
        scaler.scale(_loss(ps, x, y)).backward()
    before = _clone(ps)
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(ps[0].detach(), before[0])
    opt.zero_grad()
    with opt.perturbed():
        scaler.scale(_loss(ps, x, y) * float("inf")).backward()
    before = _clone(ps)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert scaler.get_scale() == 4.0
