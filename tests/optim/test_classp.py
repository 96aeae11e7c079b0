"""CLASSP against a direct float64 per-weight formula on fresh random data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fastclu.optim import CLASSP


def _formula(theta, grads, lr, thr, eps, p, scaling=True):
    """The paper's rule, one weight at a time in float64 (numpy)."""
    theta = theta.astype(np.float64).copy()
    acc = np.zeros_like(theta)
    flat_t, flat_a = theta.reshape(-1), acc.reshape(-1)
    for g in grads:
        for j, gj in enumerate(g.astype(np.float64).reshape(-1)):
            if gj * gj > thr:
                if scaling:
                    flat_a[j] += abs(gj) ** p
                    flat_t[j] -= lr * gj / (flat_a[j] + eps) ** (1.0 / p)
                else:
                    flat_t[j] -= lr * gj
    return theta, acc


@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("scaling", [True, False])
def test_matches_float64_formula(p: float, scaling: bool) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    shapes = [(7, 5), (13,), (3, 2, 4)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64, generator=gen)) for s in shapes]
    theta0 = [q.detach().numpy().copy() for q in params]
    opt = CLASSP(params, lr=0.2, threshold=0.5, eps=1e-5, power=p, apply_scaling=scaling)
    seq = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(4)]
    for gs in seq:
        for q, g in zip(params, gs):
            q.grad = g.clone()
        opt.step()
    for i, q in enumerate(params):
        want, acc = _formula(theta0[i], [gs[i].numpy() for gs in seq], 0.2, 0.5, 1e-5, p, scaling)
        np.testing.assert_allclose(q.detach().numpy(), want, rtol=1e-12, atol=1e-12)
        if scaling:
            np.testing.assert_allclose(opt.state[q]["acc"].numpy(), acc, rtol=1e-12, atol=1e-12)
        assert float(opt.state[q]["step"]) == 4


def test_gate_is_per_weight_and_ungated_weights_stay_bitwise() -> None:
    w = torch.nn.Parameter(torch.randn(64))
    g = torch.randn(64)
    before = w.detach().clone()
    opt = CLASSP([w], threshold=0.5)
    w.grad = g
    opt.step()
    gate = g * g > 0.5
    assert 0 < int(gate.sum()) < 64  # the public code's per-tensor gate would move all 64
    assert torch.equal(w.detach()[~gate], before[~gate])
    assert bool((w.detach()[gate] != before[gate]).all())
    assert torch.equal(opt.state[w]["acc"][~gate], torch.zeros(int((~gate).sum())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_math_in_fp32(dtype: torch.dtype) -> None:
    w32 = torch.randn(10, 9)
    w = torch.nn.Parameter(w32.to(dtype))
    ref = torch.nn.Parameter(w.detach().double())
    a, b = CLASSP([w], power=2.0), CLASSP([ref], power=2.0)
    for _ in range(3):
        g = torch.randn(10, 9)
        w.grad, ref.grad = g.to(dtype), g.to(dtype).double()
        a.step()
        b.step()
        ref.data = ref.data.to(dtype).double()  # the weights are stored in dtype after each step
    assert a.state[w]["acc"].dtype == torch.float32
    torch.testing.assert_close(w.detach().double(), ref.detach(), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-5)  # fmt: skip


def test_state_dict_round_trip_and_maximize() -> None:
    w = torch.nn.Parameter(torch.randn(20))
    opt = CLASSP([w], lr=0.1, maximize=True)
    g = torch.randn(20)
    w.grad = g.clone()
    before = w.detach().clone()
    opt.step()
    moved = g * g > 0.5
    assert bool(((w.detach() - before)[moved] * g[moved] > 0).all())  # ascent
    sd = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = CLASSP([w2], lr=0.1, maximize=True)
    opt2.load_state_dict(copy.deepcopy(sd))
    torch.testing.assert_close(opt2.state[w2]["acc"], opt.state[w]["acc"], rtol=0, atol=0)
    for o, q in ((opt, w), (opt2, w2)):
        q.grad = g.clone()
        o.step()
    assert torch.equal(w.detach(), w2.detach())
    assert sd["param_groups"][0]["threshold"] == 0.5


def test_bad_arguments_and_no_grad() -> None:
    w = torch.nn.Parameter(torch.randn(3))
    for kw in ({"lr": -1.0}, {"eps": 0.0}, {"power": 0.0}, {"threshold": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            CLASSP([w], **kw)
    opt = CLASSP([w])
    before = w.detach().clone()
    opt.step()  # no grad: no-op
    assert torch.equal(w.detach(), before)
    w.grad = torch.randn(3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_inside_a_fastclu_wrapper() -> None:
    from fastclu.optim import RandomPerturb

    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = RandomPerturb(CLASSP([w], threshold=0.0), rho=0.1, schedule="constant", seed=3)
    clean = w.detach().clone()
    with opt.perturbed():
        (w**2).sum().backward()
    assert torch.equal(w.detach(), clean)
    opt.step()
    assert not torch.equal(w.detach(), clean)
    assert "acc" in opt.state_dict()["state"][0]


def test_is_a_role_optimizer_with_fused_extras() -> None:
    """CLASSP is the fused rule: role gradients, a grad-mode mask and the anchor penalty apply."""
    from fastclu.optim import RoleOptimizer

    w = torch.nn.Parameter(torch.randn(40))
    opt = CLASSP([w], lr=0.1, threshold=0.1)
    assert isinstance(opt, RoleOptimizer)
    keep = torch.rand(40) < 0.5
    opt.set_mask([keep], mode="grad")  # gates every role: masked-out weights see g = 0
    imp, anc = torch.rand(40), torch.randn(40)
    opt.set_anchor(importance=[imp], lam=0.2, anchor=[anc])
    g_forget, g = torch.randn(40), torch.randn(40)
    w.grad = g_forget.clone()
    opt.stash("forget")
    w.grad = g.clone()
    t0 = w.detach().clone().double()
    opt.step(combine={"grad": 1.0, "forget": -2.0})
    comb = torch.where(keep, g.double() - 2.0 * g_forget.double(), 0.0)
    comb = comb + 0.2 * imp.double() * (t0 - anc.double())
    want, acc = _formula(t0.numpy(), [comb.numpy()], 0.1, 0.1, 1e-5, 1.0)
    torch.testing.assert_close(w.detach().double(), torch.from_numpy(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[w]["acc"].double(), torch.from_numpy(acc), rtol=1e-5, atol=1e-6)


def test_state_of_another_optimizer_is_refused_both_ways() -> None:
    from fastclu.optim import SGD

    w = torch.nn.Parameter(torch.randn(5))
    c = CLASSP([w])
    w.grad = torch.randn(5)
    c.step()
    s = SGD([w], lr=0.1, momentum=0.9)
    s.step()
    with pytest.raises(ValueError, match="lacks"):
        s.load_state_dict(c.state_dict())
    mixed = {**s.state_dict(), "state": c.state_dict()["state"]}
    with pytest.raises(ValueError, match=r"\['acc'"):
        s.load_state_dict(mixed)
    mixed = {**c.state_dict(), "state": s.state_dict()["state"]}
    with pytest.raises(ValueError, match="momentum_buffer"):
        c.load_state_dict(mixed)
    bad = copy.deepcopy(c.state_dict())
    bad["param_groups"][0]["power"] = -1.0
    acc = c.state[w]["acc"].clone()
    with pytest.raises(ValueError, match="power"):
        c.load_state_dict(bad)
    assert torch.equal(c.state[w]["acc"], acc)


def test_tensor_lr_and_backend_argument() -> None:
    a, b = torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(30))
    b.data.copy_(a.data)
    oa = CLASSP([a], lr=torch.tensor(0.3), power=2.0, backend="reference")
    ob = CLASSP([b], lr=0.3, power=2.0)
    for _ in range(2):
        g = torch.randn(30)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="backend"):
        CLASSP([a], backend="nope")
