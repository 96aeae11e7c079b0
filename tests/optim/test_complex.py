"""Complex parameters in fastclu's SGD / AdamW, stepped as real views like torch.optim.

Against torch on the same data: AdamW bit for bit with torch's single-tensor path (which views
complex tensors as real); SGD bit for bit with torch's on ``view_as_real`` parameters (torch's
foreach path), and within rounding of torch's single-tensor complex arithmetic (which rounds
``p + alpha * g`` differently). Masks, clip, the anchor penalty and the state layout are checked
against independent formulas and torch's state_dict.
"""

from __future__ import annotations

import pytest
import torch

import fastclu.optim
from fastclu.optim import FastSlow, PerturbMerge, RandomPerturb

SHAPES = [(5, 3), (4,), (), (0, 2)]
SGD_CASES = [
    {"lr": 0.1},
    {"lr": 0.1, "weight_decay": 0.05},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.2},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"lr": 0.1, "momentum": 0.5, "maximize": True},
]
ADAMW_CASES = [
    {"lr": 0.01},
    {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-6, "maximize": True},
]


@pytest.fixture(autouse=True)
def _unfused(monkeypatch):
    # The bit-for-bit comparisons with torch's foreach=False step are about the reference's
    # formulation without torch's fused kernel (test_parity.py checks it against fused=True).
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "0")


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, generator=g)) for s in SHAPES]


def _grads(ps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in ps]


def _run(opt: torch.optim.Optimizer, ps: list[torch.Tensor], steps: int = 4, real: bool = False) -> None:
    for t in range(steps):
        for p, g in zip(ps, _grads_like(ps, t, real)):
            p.grad = g
        opt.step()


def _grads_like(ps: list[torch.Tensor], t: int, real: bool) -> list[torch.Tensor]:
    if not real:
        return _grads(ps, t)
    # the same complex gradients, as real views, for real parameters holding view_as_real(z)
    complex_ps = [torch.view_as_complex(p.detach()) for p in ps]
    return [torch.view_as_real(g).clone() for g in _grads(complex_ps, t)]


def _real_copies(ps: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.view_as_real(p.detach()).clone()) for p in ps]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
def test_sgd_matches_torch(kw: dict, dtype: torch.dtype) -> None:
    ours, ref, ref_real = _params(dtype), _params(dtype), None
    ref_real = _real_copies(ours)
    _run(fastclu.optim.SGD(ours, **kw), ours)
    _run(torch.optim.SGD(ref, foreach=False, **kw), ref)
    _run(torch.optim.SGD(ref_real, foreach=False, **kw), ref_real, real=True)
    tol = 1e-6 if dtype == torch.complex64 else 1e-14
    for a, b, c in zip(ours, ref, ref_real):
        assert torch.equal(torch.view_as_real(a.detach()), c.detach())  # torch on real views: bit for bit
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)  # torch's complex arithmetic: rounding


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("kw", ADAMW_CASES, ids=str)
def test_adamw_matches_torch_bit_for_bit(kw: dict, dtype: torch.dtype) -> None:
    ours, ref = _params(dtype), _params(dtype)
    o, r = fastclu.optim.AdamW(ours, **kw), torch.optim.AdamW(ref, foreach=False, **kw)
    _run(o, ours)
    _run(r, ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for a, b in zip(ours, ref):
        for k, v in r.state[b].items():
            assert o.state[a][k].dtype == v.dtype, k  # complex moments, fp32 step, as torch's
            assert torch.equal(o.state[a][k].cpu(), v), k


def test_state_dict_crosses_over_to_torch_and_back() -> None:
    for ours_cls, torch_cls, kw in ((fastclu.optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                    (fastclu.optim.AdamW, torch.optim.AdamW, {"lr": 0.01, "amsgrad": True})):  # fmt: skip
        ours, ref = _params(torch.complex64), _params(torch.complex64)
        o, r = ours_cls(ours, **kw), torch_cls(ref, foreach=False, **kw)
        _run(o, ours, 2)
        _run(r, ref, 2)
        # swap checkpoints: each continues from the other's state
        o_sd, r_sd = o.state_dict(), r.state_dict()
        o2, r2 = ours_cls(ours, **kw), torch_cls(ref, foreach=False, **kw)
        o2.load_state_dict(r_sd)
        r2.load_state_dict(o_sd)
        assert {k: v.dtype for k, v in o2.state[ours[0]].items()} == {k: v.dtype for k, v in r_sd["state"][0].items()}
        for t in range(2, 4):
            for p, g in zip(ours, _grads(ours, t)):
                p.grad = g
            for p, g in zip(ref, _grads(ref, t)):
                p.grad = g
            o2.step()
            r2.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_mixed_real_and_complex_groups_match_torch() -> None:
    def build() -> list[torch.nn.Parameter]:
        g = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(4, 3, generator=g)),
                torch.nn.Parameter(torch.randn(3, dtype=torch.complex64, generator=g)),
                torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64, generator=g)),
                torch.nn.Parameter(torch.randn(2, 5, dtype=torch.complex128, generator=g))]  # fmt: skip

    ours, ref = build(), build()

    def groups(ps: list) -> list[dict]:
        return [{"params": [ps[0], ps[1]]}, {"params": [ps[2], ps[3]], "lr": 0.003, "weight_decay": 0.2}]

    o = fastclu.optim.AdamW(groups(ours), lr=0.01)
    r = torch.optim.AdamW(groups(ref), lr=0.01, foreach=False)
    _run(o, ours)
    _run(r, ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def _masked_case(mode: str) -> None:
    ps = _params(torch.complex64)
    ref = [p.detach().clone() for p in ps]
    keep = [torch.rand(p.shape, generator=torch.Generator().manual_seed(7)) < 0.5 for p in ps]
    lr, wd = 0.1, 0.3
    opt = fastclu.optim.SGD(ps, lr=lr, weight_decay=wd)
    opt.set_mask(keep, mode=mode)
    gs = _grads(ps, 0)
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    opt.step()
    for p, p0, g, m in zip(ps, ref, gs, keep):
        # float64 formula on the real and imaginary parts; one mask bit per complex element
        th, gr = torch.view_as_real(p0).double(), torch.view_as_real(g).double()
        m2 = m.unsqueeze(-1).expand(th.shape)
        if mode == "grad":
            want = th - lr * (torch.where(m2, gr, 0.0) + wd * th)
        else:
            want = torch.where(m2, th - lr * (gr + wd * th), th)
        got = torch.view_as_real(p.detach()).double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if mode == "update":  # masked-out elements do not move at all, in either part
            assert torch.equal(torch.view_as_real(p.detach())[~m], torch.view_as_real(p0)[~m])


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_mask_gates_real_and_imaginary_parts_together(mode: str) -> None:
    _masked_case(mode)


def test_combine_clip_and_penalty_on_complex() -> None:
    ps = _params(torch.complex64)
    p0 = [p.detach().clone() for p in ps]
    imp = [torch.rand(p.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(9)) for p in ps]
    anchor = [torch.randn(p.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(11)) for p in ps]
    lr, lam, clip, cf = 0.1, 0.7, 0.5, -2.0
    opt = fastclu.optim.SGD(ps, lr=lr)
    opt.set_anchor(imp, lam=lam, anchor=anchor)
    forget = _grads(ps, 1)
    remain = _grads(ps, 2)
    for p, g in zip(ps, forget):
        p.grad = g.clone()
    opt.stash("forget")
    for p, g in zip(ps, remain):
        p.grad = g.clone()
    opt.step(combine={"grad": 1.0, "forget": cf}, clip=clip)
    # float64: clip the combined gradient by its complex 2-norm sqrt(sum |z|^2), then the penalty per part
    comb = [torch.view_as_real(r).double() + cf * torch.view_as_real(f).double() for r, f in zip(remain, forget)]
    norm = torch.sqrt(sum((c**2).sum() for c in comb))
    s = min(1.0, clip / (float(norm) + 1e-6))
    assert s < 1.0
    for p, th0, c, w, a in zip(ps, p0, comb, imp, anchor):
        th = torch.view_as_real(th0).double()
        g = s * c + lam * torch.view_as_real(w).double() * (th - torch.view_as_real(a).double())
        torch.testing.assert_close(torch.view_as_real(p.detach()).double(), th - lr * g, rtol=1e-6, atol=1e-6)


def test_complex_refusals_name_the_argument() -> None:
    ps = _params(torch.complex64)
    opt = fastclu.optim.AdamW(ps, lr=0.1)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(TypeError, match=r"importance\[0\] must be a complex tensor"):
        opt.set_anchor([torch.ones(p.shape) for p in ps])
    _run(opt, ps, 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(SHAPES[0])  # a real buffer for a complex parameter
    with pytest.raises(TypeError, match=r"exp_avg.*complex"):
        opt.load_state_dict(sd)
    with pytest.raises(TypeError, match="dtype"):
        fastclu.optim.SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex32))], lr=0.1)
    after_one = [p.detach().clone() for p in ps]
    assert not all(torch.equal(a, b) for a, b in zip(before, after_one))


@pytest.mark.parametrize("wrapper", ["RandomPerturb", "PerturbMerge", "FlatLoRA"])
def test_wrappers_without_a_complex_meaning_refuse_at_construction(wrapper: str) -> None:
    ps = _params(torch.complex64)
    before = [p.detach().clone() for p in ps]
    inner = fastclu.optim.SGD(ps, lr=0.1)
    with pytest.raises(TypeError, match=f"{wrapper} does not support complex"):
        if wrapper == "RandomPerturb":
            RandomPerturb(inner, rho=0.1, schedule="constant")
        elif wrapper == "PerturbMerge":
            PerturbMerge(inner)
        else:
            from fastclu.lora import LoRAPair
            from fastclu.optim import FlatLoRA

            w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64), requires_grad=False)
            a, b = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.zeros(4, 2))
            FlatLoRA([LoRAPair("l", torch.nn.Module(), w, a, b)], rho=0.1, schedule="constant")
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    if wrapper == "RandomPerturb":
        opt = RandomPerturb(fastclu.optim.SGD(_params(torch.float32), lr=0.1), rho=0.1, schedule="constant")
        with pytest.raises(TypeError, match="RandomPerturb does not support complex"):
            opt.add_param_group({"params": (q for q in [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])})
        assert len(opt.param_groups) == 1
        opt.add_param_group({"params": (q for q in [torch.nn.Parameter(torch.randn(3))])})  # a generator, read once
        assert len(opt.param_groups[1]["params"]) == 1


def test_fastslow_syncs_complex_as_real_views() -> None:
    ps = _params(torch.complex64)
    opt = FastSlow(fastclu.optim.SGD(ps, lr=0.1), k=2, beta=0.25)
    slow0 = [p.detach().clone() for p in ps]
    _run(opt, ps, 1)
    fast1 = [p.detach().clone() for p in ps]
    _run(opt, ps, 1)  # the same gradients again, then the sync: fast2 = fast1 - lr * g
    g = _grads(ps, 0)
    for p, s0, f1, gg in zip(ps, slow0, fast1, g):
        fast2 = torch.view_as_real(f1).double() - 0.1 * torch.view_as_real(gg).double()
        s = torch.view_as_real(s0).double()
        want = s + 0.25 * (fast2 - s)
        torch.testing.assert_close(torch.view_as_real(p.detach()).double(), want, rtol=1e-6, atol=1e-6)
    assert all(s.dtype == torch.complex64 for s in opt.slow_weights())


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_triton_kernels_step_complex_views(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernels (interpreter on CPU) on real views vs the reference backend, with a
    stashed role, a grad-mode mask and clipping; the kernel calls are counted."""
    from fastclu import _registry, backends

    if backends()["triton"] is not None:
        pytest.skip(f"triton backend unavailable: {backends()['triton']}")
    calls = {"n": 0}
    for op in ("combine_step_", "gram"):
        real = _registry._impls[op]["triton"]

        def counted(*a: object, _real: object = real, **k: object) -> object:
            calls["n"] += 1
            return _real(*a, **k)

        monkeypatch.setitem(_registry._impls[op], "triton", counted)
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3} if name == "SGD" else {"lr": 3e-3, "amsgrad": True}
    results = []
    for backend in ("reference", "triton"):
        ps = _params(torch.complex64)
        o = getattr(fastclu.optim, name)(ps, backend=backend, **kw)
        o.set_mask([torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) < 0.5 for p in ps],
                   roles=["forget"])  # fmt: skip
        for t in range(3):
            for p, g in zip(ps, _grads(ps, 10 + t)):
                p.grad = g
            o.stash("forget")
            for p, g in zip(ps, _grads(ps, t)):
                p.grad = g
            o.step(combine={"grad": 1.0, "forget": -0.5}, clip=0.3)
        results.append(ps)
    assert calls["n"] >= 6  # 3 steps x (gram + combine_step_) on the kernels
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_contiguous_complex_parameter_matches_torch() -> None:
    def build() -> list[torch.nn.Parameter]:
        z = torch.randn(3, 5, dtype=torch.complex64, generator=torch.Generator().manual_seed(4))
        return [torch.nn.Parameter(z.t())]  # transposed: stepped through a contiguous working copy

    ours, ref = build(), build()
    assert not ours[0].is_contiguous()
    o = fastclu.optim.AdamW(ours, lr=0.01, weight_decay=0.1)
    r = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, foreach=False)
    _run(o, ours)
    _run(r, ref)
    assert torch.equal(ours[0], ref[0]) and ours[0].stride() == ref[0].stride()
