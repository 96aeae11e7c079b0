"""The reference combine_step_'s foreach formulation.

* plain case (one role, coefficient 1, scale 1, no mask / penalty / AMP, fp32, float lr): bit for
  bit torch.optim's multi-tensor SGD / AdamW (``foreach=True``) over several steps;
* everything else (masks in both modes, several roles, clip scale, penalty, AMP, restore_from,
  tensor lr, the device formulas that never read a tensor on the host): within rounding of the
  single-tensor formulation (the specification; test_ref_combine.py checks that one against
  torch's single-tensor step and an fp64 formula), on fresh random data;
* no host read of a tensor (``aten._local_scalar_dense``) in the device formulas.

All of it without torch's fused kernel (``FASTCLU_REFERENCE_FUSED=0``): test_ref_combine_fused.py
checks that variant.
"""

from __future__ import annotations

import pytest
import torch
from _ref_cases import SHAPES, zero_adamw_state
from _ref_cases import clone as _clone
from _ref_cases import rand as _rand
from _ref_cases import same as _same
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd
from torch.utils._python_dispatch import TorchDispatchMode

from fastclu import ops
from fastclu.ops.bits import pack_bits, unpack_bits, unpack_bits_list
from fastclu.ops.reference import _util
from fastclu.ops.reference import combine as ref_combine


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.fixture
def foreach_path(monkeypatch):
    # The foreach formulation itself: without torch's fused kernel (test_ref_combine_fused.py).
    monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", "1")
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "0")


def _step(params, grads, state, foreach, **kw):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCLU_REFERENCE_FOREACH", "1" if foreach else "0")
        mp.setenv("FASTCLU_REFERENCE_FUSED", "0")
        ops.combine_step_(params, grads, state, backend="reference", **kw)


# ------------------------------------------------------------------------------- bit parity (plain)


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov"), [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.8, 0.0, True)]
)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("forced", [True, None])
def test_sgd_bit_identical_to_torch_foreach(momentum, dampening, nesterov, weight_decay, maximize, forced, monkeypatch):
    monkeypatch.delenv("FASTCLU_REFERENCE_FOREACH", raising=False)
    if forced:
        monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", "1")
    params = _rand()
    ref = _clone(params)
    bufs = [torch.full_like(p, float("nan")) for p in params]  # poisoned: the first step must overwrite
    tbufs = [None] * len(params)
    hyper = {"weight_decay": weight_decay, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
             "maximize": maximize}  # fmt: skip
    for step in range(4):
        grads = _rand()
        state = {"momentum_buffer": bufs} if momentum else {}
        ops.combine_step_(params, [grads], state, rule="sgd", lr=0.05, init_momentum=step == 0,
                          backend="reference", **hyper)  # fmt: skip
        torch_sgd(ref, _clone(grads), tbufs, foreach=True, lr=0.05, **hyper)
        assert _same(params, ref), f"step {step}"
        if momentum:
            assert _same(bufs, tbufs)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.usefixtures("foreach_path")
def test_adamw_bit_identical_to_torch_foreach(amsgrad, weight_decay, maximize):
    params = _rand()
    ref = _clone(params)
    st = zero_adamw_state(params)
    tst = {k: _clone(v) for k, v in st.items()}
    hyper = {"amsgrad": amsgrad, "weight_decay": weight_decay, "maximize": maximize, "eps": 1e-7}
    for _ in range(5):
        grads = _rand()
        ops.combine_step_(params, [grads], st, rule="adamw", lr=3e-3, betas=(0.85, 0.99), backend="reference",
                          **hyper)  # fmt: skip
        torch_adam(ref, _clone(grads), tst["exp_avg"], tst["exp_avg_sq"], tst["max_exp_avg_sq"], tst["step"],
                   foreach=True, decoupled_weight_decay=True, beta1=0.85, beta2=0.99, lr=3e-3, **hyper)  # fmt: skip
        assert _same(params, ref)
        for k, v in st.items():
            if k != "max_exp_avg_sq" or amsgrad:
                assert _same(v, tst[k]), k


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.usefixtures("foreach_path")
def test_cpu_tensor_lr_is_bit_identical_to_the_single_tensor_path(rule):
    # A CPU lr tensor is read on the host (no device sync), so the step rounds as torch's
    # single-tensor step does with a tensor lr.
    _compare_paths(rule, "plain", lr=torch.tensor(0.02), exact=True)


# ------------------------------------------------------------------ everything else vs single-tensor


def _state(rule):
    if rule == "sgd":
        return {"momentum_buffer": _rand()}, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
    st = {"exp_avg": _rand(), "exp_avg_sq": _rand(fn=torch.rand), "max_exp_avg_sq": _rand(fn=torch.rand),
          "step": [torch.tensor(float(k + 2)) for k in range(len(SHAPES))]}  # fmt: skip
    return st, {"weight_decay": 0.05, "betas": (0.9, 0.99), "eps": 1e-6, "amsgrad": True}


def _case_kwargs(case, as_tensor, dtype=torch.float32):
    T = (lambda x: torch.tensor(x)) if as_tensor else (lambda x: x)
    kw: dict = {}
    n_roles = 1
    if case in ("multi_role", "clipped", "everything"):
        n_roles = 3
        kw["coeffs"] = [T(0.7), T(-2.5), 1.0]
    if case in ("clipped", "everything"):
        kw["scale"] = T(0.37)
    if case in ("grad_mask", "update_mask", "everything"):
        bools = [torch.rand(s) < 0.5 for s in SHAPES]
        kw["mask"] = [pack_bits(b) for b in bools]
        kw["mask_mode"] = "update" if case == "update_mask" else "grad"
        if case == "everything":
            kw["masked"] = [True, False, True]
    if case in ("penalty", "everything"):
        kw.update(penalty=T(0.3), importance=_rand(fn=torch.rand), anchor=_rand())
    if case in ("amp", "everything"):
        kw["grad_scale"] = torch.tensor(8.0)
        kw["found_inf"] = torch.tensor(0.0)
    if case in ("restore", "everything"):
        kw["restore_from"] = _rand(dtype)  # the params' dtype: the op refuses a casting restore
    return kw, n_roles


def _compare_paths(rule, case, lr=0.01, as_tensor=False, exact=False, dtype=torch.float32):
    params = _rand(dtype)
    st, hyper = _state(rule)
    kw, n_roles = _case_kwargs(case, as_tensor, dtype)
    p1, p2 = _clone(params), _clone(params)
    s1, s2 = {k: _clone(v) for k, v in st.items()}, {k: _clone(v) for k, v in st.items()}
    for _ in range(3):
        grads = [_rand(dtype) for _ in range(n_roles)]
        _step(p1, grads, s1, False, rule=rule, lr=lr, **kw, **hyper)
        _step(p2, grads, s2, True, rule=rule, lr=lr, **kw, **hyper)
    check = _same if exact else (lambda a, b: _close(a, b) or True)
    assert check(p2, p1)
    for k in st:
        assert check(s2[k], s1[k]), k
    return p1, p2


CASES = ["plain", "multi_role", "clipped", "grad_mask", "update_mask", "penalty", "amp", "restore", "everything"]


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_foreach_within_rounding_of_single_tensor(rule, case, as_tensor):
    _compare_paths(rule, case, lr=torch.tensor(0.01) if as_tensor else 0.01, as_tensor=as_tensor)


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("case", ["plain", "everything", "update_mask"])
def test_device_formulas_within_rounding_of_single_tensor(rule, case, monkeypatch):
    # HOST_READS off: the formulas that accelerator / meta tensors take (no host read at all).
    monkeypatch.setattr(_util, "HOST_READS", False)
    _compare_paths(rule, case, lr=torch.tensor(0.01), as_tensor=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_other_dtypes_match_the_single_tensor_path(dtype, rule):
    _compare_paths(rule, "everything", dtype=dtype, exact=False)


def test_mixed_dtype_params_are_grouped():
    params = [torch.randn(5), torch.randn(4, dtype=torch.float16), torch.randn(3), torch.randn(2, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    st = {"momentum_buffer": [torch.randn(p.shape, dtype=p.dtype if p.dtype == torch.float64 else torch.float32)
                              for p in params]}  # fmt: skip
    p1, p2, s1, s2 = _clone(params), _clone(params), _clone(st["momentum_buffer"]), _clone(st["momentum_buffer"])
    _step(p1, [grads], {"momentum_buffer": s1}, False, rule="sgd", lr=0.1, momentum=0.9, weight_decay=0.1)
    _step(p2, [grads], {"momentum_buffer": s2}, True, rule="sgd", lr=0.1, momentum=0.9, weight_decay=0.1)
    assert _same(p1, p2) and _same(s1, s2)
    assert [p.dtype for p in p2] == [p.dtype for p in params]


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_found_inf_selects_the_old_values_without_reading_it(rule, monkeypatch):
    monkeypatch.setattr(_util, "HOST_READS", False)
    params = _rand()
    st, hyper = _state(rule)
    before, st_before = _clone(params), {k: _clone(v) for k, v in st.items()}
    grads = _rand()
    grads[1][3] = float("inf")
    _step(params, [grads], st, True, rule=rule, lr=torch.tensor(0.1), grad_scale=torch.tensor(4.0),
          found_inf=torch.tensor(1.0), **hyper)  # fmt: skip
    assert _same(params, before)
    for k in st:
        assert _same(st[k], st_before[k]), k


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_device_formulas_never_read_a_tensor_on_the_host(rule, monkeypatch):
    monkeypatch.setattr(_util, "HOST_READS", False)
    params = _rand()
    st, hyper = _state(rule)
    kw, n_roles = _case_kwargs("everything", True)
    grads = [_rand() for _ in range(n_roles)]
    kw = {k: v for k, v in kw.items() if k not in ("coeffs", "scale", "penalty")}  # keep the scalars
    values = dict(kw, coeffs=[torch.tensor(0.7), torch.tensor(-2.5), torch.tensor(1.0)], scale=torch.tensor(0.4),
                  penalty=torch.tensor(0.3))  # fmt: skip
    reads = _HostReads()
    with ref_combine.foreach(True), reads:
        ref_combine.combine_step_(
            params, grads, st, rule=rule, lr=torch.tensor(0.01),
            weight_decay=hyper.get("weight_decay", 0.0), maximize=False, momentum=hyper.get("momentum", 0.0),
            dampening=hyper.get("dampening", 0.0), nesterov=False, init_momentum=False,
            betas=hyper.get("betas", (0.9, 0.999)), eps=hyper.get("eps", 1e-8), amsgrad=hyper.get("amsgrad", False),
            **values,
        )  # fmt: skip
    assert reads.count == 0
    assert all(torch.isfinite(p).all() for p in params)


def test_masked_out_inf_does_not_leak(foreach_path):
    bools = [torch.rand(s) < 0.5 for s in SHAPES]
    g0 = _rand()
    g1 = [torch.where(b, torch.randn_like(g), torch.full_like(g, float("inf"))) for g, b in zip(g0, bools)]
    params = _rand()
    ops.combine_step_(params, [g0, g1], {}, rule="sgd", lr=0.1, coeffs=[1.0, -1.0], mask=[pack_bits(b) for b in bools],
                      masked=[False, True], backend="reference")  # fmt: skip
    assert all(torch.isfinite(p).all() for p in params)


# ------------------------------------------------------------------------------------ the switch


def test_switch_env_and_argument(monkeypatch):
    monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", "yes")
    with pytest.raises(ValueError, match="FASTCLU_REFERENCE_FOREACH"):
        ops.combine_step_(_rand(), [_rand()], {}, rule="sgd", lr=0.1, backend="reference")
    monkeypatch.delenv("FASTCLU_REFERENCE_FOREACH")
    calls = []
    monkeypatch.setattr(ref_combine, "_step_foreach", lambda *a: calls.append("foreach"))
    monkeypatch.setattr(ref_combine, "_step_single", lambda *a: calls.append("single"))
    ops.combine_step_(_rand(), [_rand()], {}, rule="sgd", lr=0.1, backend="reference")
    monkeypatch.setenv("FASTCLU_REFERENCE_FOREACH", "0")
    ops.combine_step_(_rand(), [_rand()], {}, rule="sgd", lr=0.1, backend="reference")
    with ref_combine.foreach(True):  # the scope wins over the environment
        ops.combine_step_(_rand(), [_rand()], {}, rule="sgd", lr=0.1, backend="reference")
        with ref_combine.foreach(False):
            ops.combine_step_(_rand(), [_rand()], {}, rule="sgd", lr=0.1, backend="reference")
    assert calls == ["foreach", "single", "foreach", "single"]


# ----------------------------------------------------------------------------------------- masks


def test_unpack_bits_list_matches_unpack_bits():
    shapes = [(), (1,), (0,), (9,), (3, 5), (2, 3, 4), (65,), (8,)]
    packed = [pack_bits(torch.rand(s) < 0.5) for s in shapes]
    got = unpack_bits_list(packed, shapes)
    for g, m, s in zip(got, packed, shapes):
        assert g.shape == s and g.dtype == torch.bool
        assert torch.equal(g, unpack_bits(m, torch.Size(s).numel(), s))
    with pytest.raises(ValueError, match="shapes"):
        unpack_bits_list(packed, shapes[:-1])


def test_mask_cache_follows_writes_and_new_tensors():
    shapes = [torch.Size((4, 5)), torch.Size((9,))]
    bools = [torch.rand(s) < 0.5 for s in shapes]
    packed = [pack_bits(b) for b in bools]
    first = _util.mask_bools(packed, shapes)
    assert _util.mask_bools(packed, shapes) is first  # unpacked once for repeated steps
    flipped = ~bools[0]
    packed[0].copy_(pack_bits(flipped))  # an in-place write bumps _version
    again = _util.mask_bools(packed, shapes)
    assert again is not first and torch.equal(again[0], flipped) and torch.equal(again[1], bools[1])
    other = [pack_bits(~b) for b in bools]  # new tensors
    assert all(torch.equal(x, ~b) for x, b in zip(_util.mask_bools(other, shapes), bools))


def test_step_sees_an_in_place_mask_change(foreach_path):
    # The cache must never serve stale bits to a step.
    shapes = SHAPES
    bools = [torch.rand(s) < 0.5 for s in shapes]
    mask = [pack_bits(b) for b in bools]
    params = _rand()
    grads = _rand()
    ops.combine_step_(_clone(params), [grads], {}, rule="sgd", lr=0.1, mask=mask, backend="reference")
    for m, b in zip(mask, bools):
        m.copy_(pack_bits(~b))
    got = _clone(params)
    ops.combine_step_(got, [grads], {}, rule="sgd", lr=0.1, mask=mask, backend="reference")
    want = [p - 0.1 * torch.where(~b, g, 0.0) for p, g, b in zip(params, grads, bools)]
    _close(got, want, rtol=1e-6, atol=1e-7)
