"""Optimizer-level role combination + saliency mask + clip + penalty vs a direct float64 formula; AMP."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastclu.optim as fo
from fastclu import ops
from fastclu.saliency import SaliencyMask

SHAPES = [(6, 4), (9,), (), (3, 2, 5)]


def _params(dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]


def _grads(dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in SHAPES]


def _expected_first_step(theta, roles, coeffs, bits, gated, mode, clip, lam, imp, anc, rule, h):
    """First step from fresh state, float64, written from the documented semantics."""
    comb = []
    for i in range(len(theta)):
        g = torch.zeros(SHAPES[i], dtype=torch.float64)
        for name, c in coeffs.items():
            term = c * roles[name][i].double()
            if bits is not None and (mode == "update" or name in gated):
                term = torch.where(bits[i], term, 0.0)
            g = g + term
        comb.append(g)
    scale = 1.0
    if clip is not None:
        norm = math.sqrt(sum(float((g * g).sum()) for g in comb))
        scale = min(1.0, clip / (norm + 1e-6))
    out = []
    for i, t in enumerate(theta):
        t = t.double()
        g = comb[i] * scale
        if lam:
            g = g + lam * imp[i].double() * (t - anc[i].double())
        if rule == "sgd":
            d = g + h["weight_decay"] * t  # first step: momentum buffer = d
            new = t - h["lr"] * d
        elif rule == "classp":  # fresh acc = 0: acc = |g|**p, then the gated step
            acc = g.abs() ** h["power"]
            new = torch.where(g * g > h["threshold"], t - h["lr"] * g / (acc + h["eps"]) ** (1 / h["power"]), t)
        else:
            b1, b2 = h["betas"]
            m, v = (1 - b1) * g, (1 - b2) * g * g
            new = t * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + h["eps"])
        if bits is not None and mode == "update":
            new = torch.where(bits[i], new, t)
        out.append(new)
    return out, scale


def _make(rule, params, **kw):
    if rule == "sgd":
        h = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
        return fo.SGD(params, **h, **kw), h
    if rule == "classp":
        h = {"lr": 0.1, "threshold": 0.3, "power": 1.5, "eps": 1e-5}
        return fo.CLASSP(params, **h, **kw), h
    h = {"lr": 0.01, "weight_decay": 0.05, "betas": (0.9, 0.99), "eps": 1e-6}
    return fo.AdamW(params, **h, **kw), h


@pytest.mark.parametrize("rule", ["sgd", "adamw", "classp"])
@pytest.mark.parametrize("mode", [None, "grad", "update"])
@pytest.mark.parametrize("clip", [None, 0.5, 1e6])
@pytest.mark.parametrize("penalty", [False, True])
def test_combine_mask_clip_vs_formula(rule, mode, clip, penalty):
    params = _params()
    theta0 = [p.detach().clone() for p in params]
    opt, h = _make(rule, params)
    roles = {"forget": _grads(), "learn": _grads(), "grad": _grads()}
    coeffs = {"forget": -2.5, "learn": torch.tensor(0.75), "grad": 1.0}
    bits = None
    if mode is not None:
        bits = [torch.rand(s) < 0.6 for s in SHAPES]
        opt.set_mask(SaliencyMask.from_bool(bits), mode=mode, roles=["forget", "learn"])
    imp = [torch.rand(s) for s in SHAPES]
    anc = [torch.randn(s) for s in SHAPES]
    if penalty:
        opt.set_anchor(importance=imp, lam=0.4, anchor=anc)
    for name in ("forget", "learn"):
        for p, g in zip(params, roles[name]):
            p.grad = g.clone()
        opt.stash(name)
        assert all(p.grad is None for p in params)
    for p, g in zip(params, roles["grad"]):
        p.grad = g.clone()
    opt.step(combine=coeffs, clip=clip)
    c = {k: float(v) for k, v in coeffs.items()}
    want, scale = _expected_first_step(theta0, roles, c, bits, {"forget", "learn"}, mode, clip,
                                       0.4 if penalty else 0.0, imp, anc, rule, h)  # fmt: skip
    if clip == 0.5:
        assert scale < 1.0, "the clip must be active in this case"
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    assert opt.stashed_roles() == [], "stashed roles are consumed by step"
    if mode == "update":
        for p, b, t0 in zip(params, bits, theta0):
            assert torch.equal(p.detach()[~b], t0[~b])
            buf = opt.state[p][{"sgd": "momentum_buffer", "adamw": "exp_avg", "classp": "acc"}[rule]]
            assert torch.all(buf[~b] == 0), "masked-out state must not move"


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_grad_mode_weight_decay_moves_masked_weights(rule):
    params = _params()
    theta0 = [p.detach().clone() for p in params]
    opt, _ = _make(rule, params)
    bits = [torch.zeros(s, dtype=torch.bool) for s in SHAPES]  # everything masked out
    opt.set_mask([ops.pack_bits(b) for b in bits], mode="grad", roles=["forget"])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.stash("forget")
    opt.step(combine={"forget": 1.0})
    # the gradient is fully gated, but weight decay still moves every (nonzero) weight
    assert all(not torch.equal(p.detach(), t) for p, t in zip(params, theta0) if p.numel() and t.abs().min() > 0)


def test_stash_accumulates_and_no_copy():
    params = _params()
    opt = fo.SGD(params, lr=0.1)
    g1, g2 = _grads(), _grads()
    for p, g in zip(params, g1):
        p.grad = g
    opt.stash("forget")
    assert all(opt.state[p]["stash.forget"] is g for p, g in zip(params, g1)), "stash keeps the tensor, no copy"
    for p, g in zip(params, g2):
        p.grad = g.clone()
    want = [a + b for a, b in zip(g1, g2)]
    opt.stash("forget")
    for p, w in zip(params, want):
        torch.testing.assert_close(opt.state[p]["stash.forget"], w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="grad"):
        opt.stash("grad")


def test_missing_role_on_some_params_counts_as_zero():
    params = _params()
    theta0 = [p.detach().clone() for p in params]
    opt = fo.SGD(params, lr=0.1)
    g = _grads()
    params[0].grad = g[0].clone()
    opt.stash("forget")
    params[1].grad = g[1].clone()
    opt.step(combine={"forget": 2.0, "grad": 1.0})
    torch.testing.assert_close(params[0].detach(), theta0[0] - 0.1 * (2.0 * g[0]))
    torch.testing.assert_close(params[1].detach(), theta0[1] - 0.1 * g[1])
    for p, t in zip(params[2:], theta0[2:]):
        assert torch.equal(p.detach(), t)


@pytest.mark.parametrize("rule", ["sgd", "adamw", "classp"])
def test_bad_step_arguments_modify_nothing(rule):
    params = _params()
    opt, _ = _make(rule, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.stash("forget")
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    for kw, exc in [({"combine": {"forget": "a"}}, TypeError), ({"combine": ["forget"]}, TypeError),
                    ({"combine": {f"r{i}": 1.0 for i in range(5)}}, ValueError), ({"clip": -1.0}, ValueError),
                    ({"combine": {}}, ValueError), ({"combine": {"forget": torch.ones(2)}}, ValueError)]:  # fmt: skip
        with pytest.raises(exc):
            opt.step(**kw)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert opt.stashed_roles() == ["forget"]
    assert all(len(opt.state[p]) == 1 for p in params), "no optimizer state created by a refused step"
    with pytest.raises(ValueError, match="mode"):
        opt.set_mask([torch.ones(s, dtype=torch.bool) for s in SHAPES], mode="weights")
    with pytest.raises(ValueError, match="entries"):
        opt.set_mask([torch.ones(s, dtype=torch.bool) for s in SHAPES[:-1]])
    with pytest.raises(ValueError, match="bytes"):
        opt.set_mask([torch.zeros(100, dtype=torch.uint8) for _ in SHAPES])
    assert all("mask" not in opt.state[p] for p in params)


def _tiny_model(seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_grad_scaler_matches_unscaled_and_skips_on_inf(name):
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3} if name == "SGD" else {"lr": 0.01}
    m1 = _tiny_model(1)
    m2 = copy.deepcopy(m1)
    o1 = getattr(fo, name)(m1.parameters(), **kw)
    # fastclu's reference runs an fp32 AdamW group through torch's fused kernel
    # (FASTCLU_REFERENCE_FUSED), bit-identical to fused=True, only close to the single-tensor form
    o2 = getattr(torch.optim, name)(
        m2.parameters(), **({"fused": True} if name == "AdamW" else {"foreach": False}), **kw
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(4):
        x = torch.randn(5, 4)
        o1.zero_grad()
        scaler.scale(m1(x).square().mean()).backward()
        if step == 2:
            next(m1.parameters()).grad[0, 0] = math.inf
            snap = ([p.detach().clone() for p in m1.parameters()], copy.deepcopy(o1.state_dict()))
        scaler.step(o1)
        scale_before = scaler.get_scale()
        scaler.update()
        if step == 2:
            assert scaler.get_scale() < scale_before
            assert all(torch.equal(p.detach(), s) for p, s in zip(m1.parameters(), snap[0]))
            for k, st in o1.state_dict()["state"].items():
                for key, v in st.items():
                    assert torch.equal(v, snap[1]["state"][k][key]), f"{key} changed on a skipped step"
            continue
        o2.zero_grad()
        m2(x).square().mean().backward()
        o2.step()
        # power-of-two loss scaling is exact: the unscaled step is bit-identical to torch's
        assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters())), f"step {step}"


def test_grad_scaler_skips_on_inf_in_stashed_role():
    m = _tiny_model(2)
    opt = fo.SGD(m.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(5, 4)
    scaler.scale(m(x).sum()).backward()
    next(m.parameters()).grad[0, 0] = math.nan
    opt.stash("forget")
    scaler.scale(m(x).square().sum()).backward()
    before = [p.detach().clone() for p in m.parameters()]
    scaler.step(opt, combine={"forget": -1.0, "grad": 1.0})
    assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before))
    assert all("momentum_buffer" not in opt.state[p] for p in m.parameters()), "a skipped first step creates no state"


@pytest.mark.parametrize("name", ["SGD", "AdamW", "CLASSP"])
def test_step_restore_from_reads_clean_weights(name):
    kw = {"SGD": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}, "AdamW": {"lr": 0.01},
          "CLASSP": {"lr": 0.1, "threshold": 0.0}}[name]  # fmt: skip
    clean = _params()
    moved = [torch.nn.Parameter(p.detach() + torch.randn_like(p)) for p in clean]
    o_clean, o_moved = getattr(fo, name)(clean, **kw), getattr(fo, name)(moved, **kw)
    backup = [p.detach().clone() for p in clean]
    grads = _grads()
    for ps in (clean, moved):
        for p, g in zip(ps[:-1], grads):  # the last parameter gets no gradient
            p.grad = g.clone()
    o_clean.step()
    o_moved.step(restore_from=backup)
    for a, b in zip(clean[:-1], moved[:-1]):
        assert torch.equal(a, b)
    assert not torch.equal(moved[-1].detach(), backup[-1]), "a parameter without gradient is not restored"
    with pytest.raises(ValueError, match="restore_from"):
        o_moved.step(restore_from=backup[:-1])


def test_step_restore_from_under_amp_skip_restores_only():
    params = _params()
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    opt = fo.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)  # what GradScaler sets
    opt.step(restore_from=backup)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, backup))
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls", [fo.SGD, fo.AdamW])
def test_unknown_role_raises_and_changes_nothing(cls) -> None:
    """A role named in ``combine`` that nothing was stashed under is an error, not a silent zero:
    the step must not run (it would consume the real stash)."""
    model = torch.nn.Linear(4, 3)
    opt = cls(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.stash("forget")
    model(torch.randn(5, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="forgt"):
        opt.step(combine={"forgt": -1.0, "grad": 1.0})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.stashed_roles() == ["forget"] and not opt.state_dict()["state"].get(0, {}).get("step")
    opt.step(combine={"forget": -1.0, "grad": 1.0})
    assert opt.stashed_roles() == [] and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
