"""RandomPerturb: row-scaled Philox noise, exact or regenerated removal, schedule and checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fastclu.ops.reference.philox import philox_normal
from fastclu.optim.random_perturb import RandomPerturb


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(6, 9).to(dtype)), torch.nn.Parameter(torch.randn(7).to(dtype)),
            torch.nn.Parameter(torch.randn(3, 2, 4).to(dtype))]  # fmt: skip


def _loss(ps, x):
    w, b, c = ps
    return (torch.tanh(x.to(w.dtype) @ w.T) ** 2).sum() + (b**2).sum() + torch.sin(c).sum()


def _clone(ps):
    return [p.detach().clone() for p in ps]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at magnitude |x| (normal range), in fp64."""
    mant = {torch.float32: 23, torch.bfloat16: 7}[dtype]
    return 2.0 ** (torch.floor(torch.log2(x.double().abs().clamp_min(1e-30))) - mant)


def test_noise_matches_formula_and_regenerates_bit_identically() -> None:
    ps = _params()
    rho, T = 0.05, 10
    opt = RandomPerturb(torch.optim.SGD(ps, lr=0.0), rho=rho, schedule="cosine", total_steps=T, seed=77)
    clean = _clone(ps)
    for _ in range(3):
        opt.step()
    t = opt.step_count
    f = 0.5 * (1 - math.cos(math.pi * (t + 1) / T))
    assert opt.ramp() == pytest.approx(f)
    opt.apply_noise()
    first = _clone(ps)
    opt.remove_noise()
    opt.apply_noise()
    second = _clone(ps)
    opt.remove_noise()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Independent formula in fp64: sigma_row = f rho ||W_row|| / sqrt(n), z from the Philox contract.
    seed = opt.step_seed(t, 0)
    for i, (p, c) in enumerate(zip(first, clean)):
        rows = c.shape[0] if c.dim() >= 2 else 1
        c2 = c.double().reshape(rows, -1)
        n = c2.shape[1]
        z = philox_normal(seed, i, c.numel()).double().reshape(rows, n)
        want = c2 + f * rho * z * c2.norm(dim=1, keepdim=True) / math.sqrt(n)
        torch.testing.assert_close(p.double().reshape(rows, n), want, rtol=2e-6, atol=1e-6)
        assert not torch.equal(p, c)
    # A different step gives different noise.
    opt.step()
    opt.apply_noise()
    assert not torch.equal(ps[0].detach(), first[0])
    opt.remove_noise()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_mode_remove_restores_bits(dtype: torch.dtype) -> None:
    ps = _params(dtype)
    opt = RandomPerturb(torch.optim.SGD(ps, lr=0.01), rho=0.3, schedule="constant", seed=5)
    x = torch.randn(4, 9)
    global_rng = torch.get_rng_state()
    for _ in range(3):
        before = _clone(ps)
        with opt.perturbed():
            assert opt.noise_applied
            assert not torch.equal(ps[0].detach(), before[0])
            opt.zero_grad()
            _loss(ps, x).backward()
        assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
        with pytest.raises(ArithmeticError), opt.perturbed():
            raise ArithmeticError
        assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
        opt.step()
    assert torch.equal(torch.get_rng_state(), global_rng)


def test_step_removes_noise_then_updates() -> None:
    ps = _params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    x = torch.randn(4, 9)
    a = RandomPerturb(torch.optim.SGD(ps, lr=0.1, momentum=0.9), rho=0.1, total_steps=5, seed=1)
    b = RandomPerturb(torch.optim.SGD(ref, lr=0.1, momentum=0.9), rho=0.1, total_steps=5, seed=1)
    for _ in range(4):
        a.zero_grad()
        a.apply_noise()
        _loss(ps, x).backward()
        a.step()  # removes the noise, then updates
        assert not a.noise_applied
        b.zero_grad()
        with b.perturbed():
            _loss(ref, x).backward()
        b.step()
    assert all(torch.equal(p.detach(), r.detach()) for p, r in zip(ps, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_saving_mode_one_cycle_within_an_ulp(dtype: torch.dtype) -> None:
    ps = _params(dtype)
    opt = RandomPerturb(torch.optim.SGD(ps, lr=0.0), rho=0.05, schedule="constant", exact=False, seed=3)
    for _ in range(5):
        before = _clone(ps)
        opt.apply_noise()
        moved = _clone(ps)
        opt.remove_noise()
        for p, b, m in zip(ps, before, moved):
            bound = _ulp(torch.maximum(b.double().abs(), m.double().abs()), dtype)
            assert ((p.detach().double() - b.double()).abs() <= bound).all()
        opt.step()
    assert not opt._backup  # nothing but the row norms is kept in this mode


def _drift(dtype: torch.dtype, cycles: int) -> tuple[float, float, float]:
    w = torch.nn.Parameter(torch.randn(32, 64).to(dtype))
    w0 = w.detach().clone()
    unit = _ulp(w0.double().pow(2).mean(1, keepdim=True).sqrt(), dtype)
    opt = RandomPerturb(torch.optim.SGD([w], lr=0.0), rho=0.05, schedule="constant", exact=False, seed=123)
    for _ in range(cycles):
        opt.apply_noise()
        opt.remove_noise()
        opt.step_count += 1  # a new seed per cycle, without an update
    d = w.detach().double() - w0.double()
    return (
        float((d.abs() / unit).max()),
        float(d.pow(2).mean().sqrt() / unit.mean()),
        float(d.norm() / w0.double().norm()),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_saving_drift_short(dtype: torch.dtype) -> None:
    max_ulp, rms_ulp, rel = _drift(dtype, 20)
    print(f"{dtype} 20 cycles: max {max_ulp:.1f} ulp, rms {rms_ulp:.2f} ulp, rel {rel:.2e}")
    assert max_ulp <= 2 * 20 and rms_ulp < 2.0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_saving_drift_1000(dtype: torch.dtype) -> None:
    # The numbers in RandomPerturb's docstring come from this measurement.
    max_ulp, rms_ulp, rel = _drift(dtype, 1000)
    print(f"{dtype} 1000 cycles: max {max_ulp:.1f} ulp, rms {rms_ulp:.2f} ulp, rel {rel:.2e}")
    assert max_ulp <= 2 * 1000 and rms_ulp < 10.0


def test_checkpoint_resume_bit_identical() -> None:
    ps = _params()
    x = torch.randn(4, 9)

    def run(opt, params, n):
        for _ in range(n):
            opt.zero_grad()
            with opt.perturbed():
                _loss(params, x).backward()
            opt.step()

    opt = RandomPerturb(torch.optim.SGD(ps, lr=0.05, momentum=0.9), rho=0.1, total_steps=12, seed=42)
    run(opt, ps, 5)
    buf = io.BytesIO()
    torch.save({"model": _clone(ps), "opt": opt.state_dict()}, buf)
    run(opt, ps, 6)
    buf.seek(0)
    ck = torch.load(buf)
    ps2 = [torch.nn.Parameter(t) for t in ck["model"]]
    opt2 = RandomPerturb(torch.optim.SGD(ps2, lr=0.05, momentum=0.9), rho=0.9, schedule="constant", seed=0)
    opt2.load_state_dict(ck["opt"])
    assert (opt2.step_count, opt2.seed, opt2.schedule, opt2.total_steps) == (5, 42, "cosine", 12)
    run(opt2, ps2, 6)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ps, ps2))


def test_per_group_rho_and_scheduler() -> None:
    ps = _params()
    inner = torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "rho": 0.0}], lr=0.1)
    opt = RandomPerturb(inner, rho=0.2, schedule="constant")
    assert [g["rho"] for g in opt.param_groups] == [0.2, 0.0]
    clean = _clone(ps)
    with opt.perturbed():
        assert not torch.equal(ps[0].detach(), clean[0])
        assert all(torch.equal(p.detach(), c) for p, c in zip(ps[1:], clean[1:]))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    extra = torch.nn.Parameter(torch.randn(2, 2))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["rho"] == 0.2


def test_validation_and_guards() -> None:
    ps = _params()
    inner = torch.optim.SGD(ps, lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        RandomPerturb(inner, schedule="cosine")
    with pytest.raises(ValueError, match="schedule"):
        RandomPerturb(inner, schedule="linear", total_steps=3)
    with pytest.raises(ValueError, match="rho"):
        RandomPerturb(inner, rho=-0.1, schedule="constant")
    with pytest.raises(ValueError, match="total_steps"):
        RandomPerturb(inner, total_steps=0)
    with pytest.raises(ValueError, match="seed"):
        RandomPerturb(inner, schedule="constant", seed=-1)
    assert "rho" not in inner.param_groups[0]  # failed constructions left the groups alone
    opt = RandomPerturb(inner, schedule="constant")
    opt.apply_noise()
    with pytest.raises(RuntimeError, match="already applied"):
        opt.apply_noise()
    with pytest.raises(RuntimeError, match="remove"):
        opt.state_dict()
    opt.remove_noise()
    sd = opt.state_dict()
    bad = dict(sd, random_perturb=dict(sd["random_perturb"], schedule="nope"))
    with pytest.raises(ValueError, match="schedule"):
        opt.load_state_dict(bad)
    assert opt.schedule == "constant"
