"""FastSlow: Lookahead-style slow weights around any optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from fastclu.optim.fastslow import FastSlow


def _problem(dtype: torch.dtype = torch.float64, seed_shift: int = 0):
    """Tiny regression model (two tensors) and a deterministic batch stream."""
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64).to(dtype))
    b = torch.nn.Parameter(torch.randn(6, dtype=torch.float64).to(dtype))
    xs = [torch.randn(9, 5, dtype=torch.float64) for _ in range(40)]
    ys = [torch.randn(9, 6, dtype=torch.float64) for _ in range(40)]
    return [w, b], xs, ys


def _loss(ps, x, y):
    w, b = ps
    return ((x.to(w.dtype) @ w.T + b - y.to(w.dtype)) ** 2).mean()


def _grad_fn(xs, ys):
    def grads(t: int, ps):
        ws = [p.detach().clone().requires_grad_() for p in ps]
        return torch.autograd.grad(_loss(ws, xs[t], ys[t]), ws)

    return grads


def _run(opt, ps, xs, ys, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        opt.zero_grad()
        _loss(ps, xs[t], ys[t]).backward()
        opt.step()


def _inner_factories():
    import fastclu.optim as fo

    return {
        "torch_sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        "torch_adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01),
        "fastclu_sgd": lambda ps: fo.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        "fastclu_adamw": lambda ps: fo.AdamW(ps, lr=0.01),
    }


@pytest.mark.parametrize("inner", ["torch_sgd", "torch_adamw", "fastclu_sgd", "fastclu_adamw"])
def test_k1_beta1_equals_inner_optimizer(inner: str) -> None:
    make = _inner_factories()[inner]
    ps, xs, ys = _problem()
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt = FastSlow(make(ps), k=1, beta=1.0)
    plain = make(ref)
    _run(opt, ps, xs, ys, 12)
    _run(plain, ref, xs, ys, 12)
    for p, r in zip(ps, ref):
        # slow + 1 * (fast - slow) may differ from fast by a rounding in the last place
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-14, atol=1e-14)


def test_matches_direct_lookahead_formula_with_torch_sgd() -> None:
    ps, xs, ys = _problem()
    grads = _grad_fn(xs, ys)
    k, beta, lr, mom, steps = 3, 0.4, 0.05, 0.9, 14
    # Independent formulation: fast weights by the SGD-momentum recursion written out,
    # slow weights phi <- phi + beta (theta - phi), theta <- phi every k steps; momentum kept.
    theta = [p.detach().clone() for p in ps]
    phi = [t.clone() for t in theta]
    buf = [None, None]
    for t in range(steps):
        g = grads(t, theta)
        for i in range(2):
            buf[i] = g[i].clone() if buf[i] is None else mom * buf[i] + g[i]
            theta[i] = theta[i] - lr * buf[i]
        if (t + 1) % k == 0:
            for i in range(2):
                phi[i] = phi[i] + beta * (theta[i] - phi[i])
                theta[i] = phi[i].clone()
    opt = FastSlow(torch.optim.SGD(ps, lr=lr, momentum=mom), k=k, beta=beta)
    _run(opt, ps, xs, ys, steps)
    for p, t, s, sw in zip(ps, theta, phi, opt.slow_weights()):
        torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sw, s, rtol=1e-12, atol=1e-12)
    assert opt.step_count == steps


def test_bf16_params_keep_fp32_slow_weights() -> None:
    ps, xs, ys = _problem(torch.bfloat16)
    opt = FastSlow(torch.optim.SGD(ps, lr=0.05), k=2, beta=0.5)
    _run(opt, ps, xs, ys, 4)
    for p, s in zip(ps, opt.slow_weights()):
        assert s.dtype == torch.float32
        assert torch.equal(p.detach(), s.to(torch.bfloat16))  # fast <- slow right after a sync


def test_checkpoint_resume_bit_identical() -> None:
    ps, xs, ys = _problem(torch.float32)
    mk = lambda params: FastSlow(torch.optim.SGD(params, lr=0.05, momentum=0.9), k=4, beta=0.5)
    opt = mk(ps)
    _run(opt, ps, xs, ys, 6)  # mid-cycle: 6 % 4 != 0
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
    _run(opt, ps, xs, ys, 9, start=6)
    buf.seek(0)
    ck = torch.load(buf)
    ps2 = [torch.nn.Parameter(t) for t in ck["model"]]
    opt2 = FastSlow(torch.optim.SGD(ps2, lr=0.05, momentum=0.9), k=1, beta=1.0)  # overwritten by the load
    opt2.load_state_dict(ck["opt"])
    assert (opt2.k, opt2.beta, opt2.step_count) == (4, 0.5, 6)
    _run(opt2, ps2, xs, ys, 9, start=6)
    for a, b in zip(ps, ps2):
        assert torch.equal(a.detach(), b.detach())
    for a, b in zip(opt.slow_weights(), opt2.slow_weights()):
        assert torch.equal(a, b)


def test_scheduler_param_groups_and_zero_grad() -> None:
    ps, xs, ys = _problem()
    inner = torch.optim.SGD(ps, lr=0.1)
    opt = FastSlow(inner, k=2)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _run(opt, ps, xs, ys, 1)
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    (extra**2).sum().backward()
    before = extra.detach().clone()
    opt.step()  # second step: a sync (k=2); slow starts from the weights before this step
    lr = opt.param_groups[-1]["lr"]  # the new group's own lr (the defaults'), not the scheduled one
    want = before + 0.5 * ((before - lr * 2 * before) - before)
    torch.testing.assert_close(opt.slow_weights()[-1], want, rtol=1e-14, atol=1e-14)
    assert torch.equal(extra.detach(), opt.slow_weights()[-1])
    hits = []
    opt.register_step_post_hook(lambda o, a, k: hits.append(1))
    opt.step()
    assert hits == [1]
    assert "FastSlow" in repr(opt) and "k=2" in repr(opt)


def test_same_wrapper_nested_twice_refuses_state_dict() -> None:
    ps, _, _ = _problem()
    opt = FastSlow(FastSlow(torch.optim.SGD(ps, lr=0.05), k=2, beta=0.5), k=3, beta=0.25)
    with pytest.raises(RuntimeError, match="fastslow"):
        opt.state_dict()  # same key twice cannot nest


def test_rejects_bad_arguments_and_bad_state() -> None:
    ps, xs, ys = _problem()
    inner = torch.optim.SGD(ps, lr=0.1)
    with pytest.raises(ValueError, match="k"):
        FastSlow(inner, k=0)
    with pytest.raises(TypeError, match="k"):
        FastSlow(inner, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        FastSlow(inner, beta=1.5)
    with pytest.raises(TypeError, match="optimizer"):
        FastSlow(ps, k=2)  # type: ignore[arg-type]
    opt = FastSlow(inner, k=2)
    _run(opt, ps, xs, ys, 3)
    sd = opt.state_dict()
    before = (copy.deepcopy(opt.slow_weights()), opt.step_count, copy.deepcopy(inner.state_dict()))
    bad = dict(sd, fastslow=dict(sd["fastslow"], slow={0: torch.zeros(2)}))
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="fastslow"):
        opt.load_state_dict({k: v for k, v in sd.items() if k != "fastslow"})
    assert opt.step_count == before[1]
    assert all(torch.equal(a, b) for a, b in zip(opt.slow_weights(), before[0]))


def test_stack_forwards_fastclu_api_and_round_trips() -> None:
    import fastclu.optim as fo

    ps, xs, ys = _problem(torch.float32)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FastSlow(fo.PerturbMerge(fo.SGD(ps, lr=0.05, momentum=0.9), probs=(1, 0, 0)), k=1, beta=1.0)
    plain = fo.SGD(ref, lr=0.05, momentum=0.9)
    for t in range(4):
        for o, params in ((opt, ps), (plain, ref)):
            o.zero_grad()
            _loss(params, xs[t], ys[t]).backward()
            o.stash("forget")  # FastSlow -> PerturbMerge -> fastclu SGD
            _loss(params, xs[t + 1], ys[t + 1]).backward()
            o.step(combine={"grad": 1.0, "forget": -0.5})
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    with opt.perturbed() as k:  # the inner wrapper's context, reached through the outer one
        assert k == 0
    sd = opt.state_dict()
    assert {"fastslow", "perturb_merge", "state", "param_groups"} <= sd.keys()
    opt2 = FastSlow(fo.PerturbMerge(fo.SGD(ref, lr=0.05, momentum=0.9)), k=3)
    opt2.load_state_dict(sd)
    assert opt2.k == 1 and opt2.optimizer.probs == (1.0, 0.0, 0.0)


@pytest.mark.interpreter
def test_wrapper_stack_on_triton_matches_reference() -> None:
    """All three wrappers and hvp, stacked, with backend='triton' (interpreted on a CPU) vs 'reference'."""
    from fastclu.optim import PerturbMerge, RandomPerturb
    from fastclu.perturb import hvp

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    init = [torch.randn(6, 5, device=dev), torch.randn(7, device=dev)]
    x = torch.randn(4, 5, device=dev)
    v = [torch.randn_like(p) for p in init]

    def run(backend: str):
        ps = [torch.nn.Parameter(p.clone()) for p in init]

        def loss():
            return (torch.tanh(x @ ps[0].T) ** 2).sum() + (ps[1] ** 2).sum()

        fs = FastSlow(torch.optim.SGD(ps, lr=0.1, momentum=0.5), k=2, backend=backend)
        pm = PerturbMerge(fs, probs=(0, 0.5, 0.5), seed=4, backend=backend)
        rp = RandomPerturb(pm, rho=0.1, schedule="constant", seed=8, backend=backend)
        for _ in range(2):
            for _ in range(3):
                rp.zero_grad()
                with rp.perturbed(), pm.perturbed():
                    loss().backward()
                pm.accumulate_fisher()
                rp.step()
            pm.end_task()
        return [p.detach().clone() for p in ps], hvp(ps, loss, v, backend=backend), pm.last_alpha

    w_ref, h_ref, a_ref = run("reference")
    w_tri, h_tri, a_tri = run("triton")
    for a, b in zip(w_ref, w_tri):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_ref, a_tri, rtol=1e-5, atol=1e-6)
    for a, b in zip(h_ref, h_tri):
        # weights differing by an ulp move the finite difference by ~ulp / eps
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
