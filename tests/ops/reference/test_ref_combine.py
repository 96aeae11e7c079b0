"""Reference combine_step_: bit parity with torch's single-tensor SGD / AdamW, and an fp64 formula.

Every input is fresh random data; outputs are checked against torch.optim's functional API
(bit for bit, in the plain case) or an independent float64 formula written element-wise here.
"""

from __future__ import annotations

import math

import pytest
import torch
from _ref_cases import clone as _clone
from _ref_cases import same as _same
from _ref_cases import zero_adamw_state
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from fastclu import ops
from fastclu.ops.reference import combine as ref_combine

SHAPES = [(7, 5), (13,), (), (0,), (3, 1, 4), (33,)]


def _rand(shapes=SHAPES, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes]


def _rand_mask(shapes=SHAPES, p=0.5):
    bools = [torch.rand(s) < p for s in shapes]
    return bools, [ops.pack_bits(b) for b in bools]


@pytest.fixture
def single_tensor(monkeypatch):
    """The single-tensor formulation (the specification) of the reference."""
    monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", "0")


@pytest.fixture(params=["single", "foreach", "fused"])
def both_paths(request, monkeypatch):
    """Each test below runs on both formulations of the reference, the foreach one with and
    without torch's fused kernel (test_ref_combine_foreach.py and test_ref_combine_fused.py
    compare them with each other)."""
    monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", "0" if request.param == "single" else "1")
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "1" if request.param == "fused" else "0")


# ---------------------------------------------------------------------------------------- bit parity


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False),
                                                         (0.8, 0.0, True)])  # fmt: skip
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.usefixtures("single_tensor")
def test_sgd_bit_identical_to_torch(momentum, dampening, nesterov, weight_decay, maximize, tensor_lr):
    params = _rand()
    ref = _clone(params)
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    bufs = [torch.full_like(p, float("nan")) for p in params]  # poisoned: the first step must overwrite
    tbufs = [None] * len(params)
    hyper = {"weight_decay": weight_decay, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
                 "maximize": maximize}  # fmt: skip
    for step in range(4):
        grads = _rand()
        state = {"momentum_buffer": bufs} if momentum else {}
        ops.combine_step_(params, [grads], state, rule="sgd", lr=lr, init_momentum=step == 0, backend="reference",
                          **hyper)  # fmt: skip
        torch_sgd(ref, _clone(grads), tbufs, foreach=False, lr=lr, **hyper)
        assert _same(params, ref), f"step {step}"
        if momentum:
            assert _same(bufs, tbufs)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.usefixtures("single_tensor")
def test_adamw_bit_identical_to_torch(amsgrad, weight_decay, maximize, tensor_lr):
    params = _rand()
    ref = _clone(params)
    lr = torch.tensor(3e-3) if tensor_lr else 3e-3
    st = zero_adamw_state(params)
    tst = {k: _clone(v) for k, v in st.items()}
    for _ in range(5):
        grads = _rand()
        ops.combine_step_(
            params,
            [grads],
            st,
            rule="adamw",
            lr=lr,
            betas=(0.85, 0.99),
            eps=1e-7,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            maximize=maximize,
            backend="reference",
        )
        torch_adam(
            ref,
            _clone(grads),
            tst["exp_avg"],
            tst["exp_avg_sq"],
            tst["max_exp_avg_sq"],
            tst["step"],
            foreach=False,
            decoupled_weight_decay=True,
            amsgrad=amsgrad,
            beta1=0.85,
            beta2=0.99,
            lr=lr,
            weight_decay=weight_decay,
            eps=1e-7,
            maximize=maximize,
        )
        assert _same(params, ref)
        for k, v in st.items():
            if k != "max_exp_avg_sq" or amsgrad:
                assert _same(v, tst[k]), k


@pytest.mark.usefixtures("both_paths")
def test_input_grads_not_modified():
    params, grads = _rand(), _rand()
    keep = _clone(grads)
    st = {"momentum_buffer": [torch.zeros_like(p) for p in params]}
    ops.combine_step_(params, [grads, grads], st, rule="sgd", lr=0.1, momentum=0.9, weight_decay=0.1,
                      coeffs=[1.0, 1.0], init_momentum=True, backend="reference")  # fmt: skip
    assert _same(grads, keep)


# ------------------------------------------------------------------------------ fp64 direct formula


def _direct(theta, grads, coeffs, scale, bits, masked, mode, lam, imp, anc, gscale, rule, st, h):
    """One step, element-wise in float64, written from the contract (not from the reference)."""
    theta = [t.double() for t in theta]
    out_t, out_s = [], {k: [] for k in st}
    for i, t in enumerate(theta):
        g = torch.zeros_like(t)
        for r, gr in enumerate(grads):
            term = coeffs[r] * gr[i].double()
            if bits is not None and masked[r] and mode == "grad":
                term = torch.where(bits[i], term, 0.0)
            g = g + term
        g = g * scale
        if gscale is not None:
            g = g / gscale
        if imp is not None:
            g = g + lam * imp[i].double() * (t - anc[i].double())
        if h.get("maximize"):
            g = -g
        s = {k: v[i].double() for k, v in st.items()}
        if rule == "sgd":
            d = g + h["weight_decay"] * t
            if h["momentum"]:
                b = d if h["init"] else h["momentum"] * s["momentum_buffer"] + (1 - h["dampening"]) * d
                s["momentum_buffer"] = b
                d = d + h["momentum"] * b if h["nesterov"] else b
            new = t - h["lr"] * d
        else:
            b1, b2 = h["betas"]
            step = float(s["step"]) + 1
            s["step"] = torch.tensor(step, dtype=torch.float64)
            m = b1 * s["exp_avg"] + (1 - b1) * g
            v = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
            s["exp_avg"], s["exp_avg_sq"] = m, v
            vhat = v / (1 - b2**step)
            new = t * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * (m / (1 - b1**step)) / (vhat.sqrt() + h["eps"])
        if bits is not None and mode == "update":
            new = torch.where(bits[i], new, t)
            s = {k: v if k == "step" else torch.where(bits[i], v, st[k][i].double()) for k, v in s.items()}
        out_t.append(new)
        for k, v in s.items():
            out_s[k].append(v)
    return out_t, out_s


def _close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["none", "grad", "update"])
@pytest.mark.parametrize("tensor_scalars", [False, True])
@pytest.mark.usefixtures("both_paths")
def test_combination_mask_penalty_amp_vs_fp64(rule, mode, tensor_scalars):
    params = _rand()
    before = _clone(params)
    grads = [_rand() for _ in range(3)]
    coeffs = [0.7, -2.5, 1.3]
    masked = [True, False, True]
    bools, packed = _rand_mask() if mode != "none" else (None, None)
    imp = [torch.rand(s) for s in SHAPES]
    anc = _rand()
    lam, scale, gs = 0.3, 0.6, 8.0
    if rule == "sgd":
        st = {"momentum_buffer": _rand()}
        h = {"lr": 0.05, "weight_decay": 0.01, "momentum": 0.9, "dampening": 0.1, "nesterov": False, "init": False}
        extra = {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
    else:
        st = {
            "exp_avg": _rand(),
            "exp_avg_sq": [torch.rand(s) for s in SHAPES],
            "step": [torch.tensor(3.0) for _ in SHAPES],
        }
        h = {"lr": 0.01, "weight_decay": 0.05, "betas": (0.9, 0.99), "eps": 1e-6}
        extra = {"weight_decay": 0.05, "betas": (0.9, 0.99), "eps": 1e-6}
    want_t, want_s = _direct(params, grads, coeffs, scale, bools, masked, mode, lam, imp, anc, gs, rule, st, h)
    T = (lambda x: torch.tensor(x)) if tensor_scalars else (lambda x: x)
    ops.combine_step_(
        params, grads, st, rule=rule, lr=T(h["lr"]), coeffs=[T(c) for c in coeffs], scale=T(scale), mask=packed,
        masked=masked if packed else None, mask_mode="grad" if mode == "none" else mode, penalty=T(lam),
        importance=imp, anchor=anc, grad_scale=torch.tensor(gs), backend="reference", **extra,
    )  # fmt: skip
    _close(params, want_t)
    for k in st:
        _close(st[k], want_s[k])
    if mode == "update":
        for p, b, old in zip(params, bools, before):
            assert torch.equal(p[~b], old[~b]), "masked-out weights must not move at all"


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.usefixtures("both_paths")
def test_found_inf_skips_everything(rule):
    params = _rand()
    before = _clone(params)
    if rule == "sgd":
        st = {"momentum_buffer": _rand()}
        kw = {"momentum": 0.9}
    else:
        st = {
            "exp_avg": _rand(),
            "exp_avg_sq": [torch.rand(s) for s in SHAPES],
            "step": [torch.tensor(2.0) for _ in SHAPES],
        }
        kw = {}
    st_before = {k: _clone(v) for k, v in st.items()}
    ops.combine_step_(params, [_rand()], st, rule=rule, lr=0.1, grad_scale=torch.tensor(4.0),
                      found_inf=torch.tensor(1.0), backend="reference", **kw)  # fmt: skip
    assert _same(params, before)
    for k in st:
        assert _same(st[k], st_before[k])


@pytest.mark.usefixtures("both_paths")
def test_restore_from_reads_clean_weights():
    clean = _rand()
    perturbed = [c + torch.randn_like(c) for c in clean]
    grads = _rand()
    want = _clone(clean)
    ops.combine_step_(want, [grads], {}, rule="sgd", lr=0.1, weight_decay=0.1, backend="reference")
    ops.combine_step_(perturbed, [grads], {}, rule="sgd", lr=0.1, weight_decay=0.1, restore_from=clean,
                      backend="reference")  # fmt: skip
    assert _same(perturbed, want)
    # the restore still happens when AMP skips the step
    perturbed = [c + 1.0 for c in clean]
    ops.combine_step_(perturbed, [grads], {}, rule="sgd", lr=0.1, restore_from=clean, found_inf=torch.tensor(1.0),
                      backend="reference")  # fmt: skip
    assert _same(perturbed, clean)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.usefixtures("both_paths")
def test_low_precision_params_math_in_fp32(dtype, rule):
    params = _rand(dtype=dtype)
    p32 = [p.float() for p in params]
    grads = _rand(dtype=dtype)
    if rule == "sgd":
        mk = lambda: {"momentum_buffer": [torch.randn(s) for s in SHAPES]}
        kw = {"momentum": 0.9, "weight_decay": 0.01}
    else:
        mk = lambda: {
            "exp_avg": [torch.randn(s) for s in SHAPES],
            "exp_avg_sq": [torch.rand(s) for s in SHAPES],
            "step": [torch.tensor(1.0) for _ in SHAPES],
        }
        kw = {"weight_decay": 0.01}
    st = mk()
    st32 = {k: _clone(v) for k, v in st.items()}
    ops.combine_step_(params, [grads], st, rule=rule, lr=0.01, backend="reference", **kw)
    with ref_combine.fused(False):  # an fp16 / bf16 group never takes torch's fused kernel: compare like with like
        ops.combine_step_(p32, [[g.float() for g in grads]], st32, rule=rule, lr=0.01, backend="reference", **kw)
    assert all(p.dtype == dtype for p in params)
    assert _same(params, [p.to(dtype) for p in p32])
    for k in st:
        assert all(x.dtype == torch.float32 for x in st[k])
        assert _same(st[k], st32[k])


@pytest.mark.usefixtures("both_paths")
def test_masked_out_inf_does_not_leak():
    params = _rand()
    bools, packed = _rand_mask()
    g0 = _rand()
    g1 = [torch.where(b, torch.randn_like(g), torch.full_like(g, math.inf)) for g, b in zip(g0, bools)]
    ops.combine_step_(params, [g0, g1], {}, rule="sgd", lr=0.1, coeffs=[1.0, -1.0], mask=packed,
                      masked=[False, True], backend="reference")  # fmt: skip
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.usefixtures("both_paths")
def test_bad_input_leaves_state_untouched():
    params = _rand()
    before = _clone(params)
    with pytest.raises(ValueError, match="mask_mode"):
        ops.combine_step_(params, [_rand()], {}, rule="sgd", lr=0.1, mask_mode="update", backend="reference")
    with pytest.raises(ValueError, match="momentum_buffer"):
        ops.combine_step_(params, [_rand()], {}, rule="sgd", lr=0.1, momentum=0.9, backend="reference")
    with pytest.raises(ValueError, match="coeffs"):
        ops.combine_step_(params, [_rand()], {}, rule="sgd", lr=0.1, coeffs=[1.0, 2.0], backend="reference")
    assert _same(params, before)


@pytest.mark.parametrize("own", [False, True], ids=["clip_gram", "clip_own"])
@pytest.mark.parametrize("tensor_clip", [False, True])
def test_clip_gram_is_clip_grad_norm_of_the_combination(tensor_clip: bool, own: bool, both_paths) -> None:
    """``clip_gram=`` (or ``clip_own=True``) + ``clip=``: the factor of torch's clip_grad_norm_ on
    the unscaled masked combination, checked against float64 from the raw tensors (SGD, lr 1: the
    step is the gradient), on each formulation of the reference."""
    params, roles = _rand(), [_rand(), _rand()]
    bools, masks = _rand_mask()
    coeffs, gs, clip = [-3.0, 1.0], torch.tensor(4.0), 0.2
    comb = [(coeffs[0] * torch.where(b, g0.double(), 0.0) + coeffs[1] * g1.double()) / 4.0
            for b, g0, g1 in zip(bools, *roles)]  # fmt: skip
    norm = math.sqrt(sum(float((x * x).sum()) for x in comb))
    factor = min(1.0, clip / (norm + 1e-6))
    assert factor < 0.5  # the clip is active
    want = [p.double() - factor * x for p, x in zip(params, comb)]
    gram = ops.gram(roles, mask=masks, masked=[True, False], backend="reference")
    got = _clone(params)
    ops.combine_step_(got, roles, {}, rule="sgd", lr=1.0, coeffs=coeffs, mask=masks, masked=[True, False],
                      grad_scale=gs, clip_gram=None if own else gram, clip_own=own,
                      clip=torch.tensor(clip) if tensor_clip else clip, backend="reference")  # fmt: skip
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_clip_gram_nan_poisons_every_weight() -> None:
    # torch's clip_grad_norm_ (error_if_nonfinite=False) multiplies by a NaN factor: so does the step
    params, roles = _rand(), [_rand()]
    gram = torch.full((1, 1), float("nan"))
    ops.combine_step_(params, roles, {}, rule="sgd", lr=0.1, clip_gram=gram, clip=1.0, backend="reference")
    assert all(bool(p.isnan().all()) for p in params if p.numel())
