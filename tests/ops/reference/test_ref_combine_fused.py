"""The reference combine_step_'s foreach formulation on torch's fused AdamW kernel.

* plain case (one role, coefficient 1, scale 1, no mask / penalty / AMP, fp32): bit for bit
  torch.optim's ``fused=True`` AdamW step over several steps (amsgrad, tensor lr, weight decay,
  maximize);
* everything else (several roles, a grad-mode mask, a 0-d tensor clip scale, the penalty,
  maximize, amsgrad, a tensor lr, AMP's grad_scale): within rounding of the single-tensor
  formulation (the specification), on fresh random data with random state;
* AMP's found_inf: the step leaves parameters, moments and counters bit for bit untouched;
* which groups take the kernel (fp32 on the CPU, not update-mode masks, host reads allowed) and
  the switch (``fused(flag)``, ``FASTCLU_REFERENCE_FUSED``), counted on ``torch._fused_adamw_``.
"""

from __future__ import annotations

import pytest
import torch
from _ref_cases import SHAPES, zero_adamw_state
from _ref_cases import clone as _clone
from _ref_cases import rand as _rand
from _ref_cases import same as _same
from torch.optim.adam import adam as torch_adam

from fastclu import ops
from fastclu.ops.bits import pack_bits
from fastclu.ops.reference import _util
from fastclu.ops.reference import combine as ref_combine


def _bits_same(a, b):
    # Bit for bit, the sign of a zero and NaN payloads included.
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))


@pytest.fixture
def calls(monkeypatch):
    """The number of ``torch._fused_adamw_`` calls made (the kernel still runs)."""
    count = [0]
    real = torch._fused_adamw_

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counted)
    monkeypatch.delenv("FASTCLU_REFERENCE_FOREACH", raising=False)
    monkeypatch.delenv("FASTCLU_REFERENCE_FUSED", raising=False)
    return count


def _state(dtype=torch.float32):
    # Random moments (exp_avg_sq / max nonnegative) and counters past the first step.
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "exp_avg": _rand(sd),
        "exp_avg_sq": _rand(sd, torch.rand),
        "max_exp_avg_sq": _rand(sd, torch.rand),
        "step": [torch.tensor(float(k + 2)) for k in range(len(SHAPES))],
    }


# ------------------------------------------------------------------------------- bit parity (plain)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_plain_step_bit_identical_to_torch_fused(amsgrad, weight_decay, maximize, tensor_lr, calls):
    lr = torch.tensor(3e-3) if tensor_lr else 3e-3
    params = _rand()
    ref = _clone(params)
    st = zero_adamw_state(params)
    tst = {k: _clone(v) for k, v in st.items()}
    hyper = {"amsgrad": amsgrad, "weight_decay": weight_decay, "maximize": maximize, "eps": 1e-7}
    for step in range(5):
        grads = _rand()
        before = _clone(grads)
        n = calls[0]
        ops.combine_step_(params, [grads], st, rule="adamw", lr=lr, betas=(0.85, 0.99), backend="reference", **hyper)
        assert calls[0] == n + 1
        assert _bits_same(grads, before)  # the input gradients are read, never written
        maxs = tst["max_exp_avg_sq"] if amsgrad else []  # torch.optim passes none without amsgrad
        torch_adam(ref, _clone(grads), tst["exp_avg"], tst["exp_avg_sq"], maxs, tst["step"],
                   fused=True, decoupled_weight_decay=True, beta1=0.85, beta2=0.99, lr=lr, **hyper)  # fmt: skip
        assert _same(params, ref), f"step {step}"
        for k, v in st.items():
            if k != "max_exp_avg_sq" or amsgrad:
                assert _same(v, tst[k]), k


def test_optimizer_bit_identical_to_torch_fused(calls):
    # The same through fastclu.optim.AdamW (two param groups) against torch.optim.AdamW(fused=True).
    import fastclu.optim as fo

    torch.manual_seed(int(torch.randint(1000, ())))
    m1 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    m2 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    m2.load_state_dict(m1.state_dict())
    kw = {"lr": 2e-3, "betas": (0.8, 0.95), "weight_decay": 0.05, "amsgrad": True}
    groups = lambda m: [{"params": list(m.parameters())[:2]}, {"params": list(m.parameters())[2:], "lr": 0.01}]
    o1 = fo.AdamW(groups(m1), backend="reference", **kw)
    o2 = torch.optim.AdamW(groups(m2), fused=True, **kw)
    for _ in range(6):
        x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert _same(list(m1.parameters()), list(m2.parameters()))
    for p, q in zip(m1.parameters(), m2.parameters()):
        for k, v in o2.state[q].items():
            assert torch.equal(o1.state[p][k], v), k
    assert calls[0] > 0


# ------------------------------------------------------------------ everything else vs single-tensor


def _case_kwargs(case):
    kw: dict = {}
    n_roles = 2 if case in ("two_roles", "grad_mask", "everything") else 1
    if n_roles == 2:
        kw["coeffs"] = [1.0, -1.0] if case == "grad_mask" else [torch.tensor(0.7), -2.5]
    if case in ("grad_mask", "everything"):
        kw["mask"] = [pack_bits(torch.rand(s) < 0.5) for s in SHAPES]
        kw["mask_mode"] = "grad"
        kw["masked"] = [False, True]
    if case in ("clipped", "grad_mask", "everything"):
        kw["scale"] = torch.tensor(0.37)
    if case in ("penalty", "everything"):
        kw.update(penalty=torch.tensor(0.3), importance=_rand(fn=torch.rand), anchor=_rand())
    if case in ("amp", "everything"):
        kw["grad_scale"] = torch.tensor(8.0)
        kw["found_inf"] = torch.tensor(0.0)
    if case in ("maximize", "everything"):
        kw["maximize"] = True
    return kw, n_roles


CASES = ["plain", "two_roles", "grad_mask", "clipped", "penalty", "amp", "maximize", "everything"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_fused_within_rounding_of_single_tensor(case, amsgrad, tensor_lr, calls):
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    params = _rand()
    st = _state()
    kw, n_roles = _case_kwargs(case)
    hyper = {"weight_decay": 0.05, "betas": (0.9, 0.99), "eps": 1e-6, "amsgrad": amsgrad}
    p1, p2 = _clone(params), _clone(params)
    s1, s2 = {k: _clone(v) for k, v in st.items()}, {k: _clone(v) for k, v in st.items()}
    for _ in range(3):
        grads = [_rand() for _ in range(n_roles)]
        before = [_clone(r) for r in grads]
        with ref_combine.foreach(False):
            ops.combine_step_(p1, grads, s1, rule="adamw", lr=lr, backend="reference", **kw, **hyper)
        ops.combine_step_(p2, grads, s2, rule="adamw", lr=lr, backend="reference", **kw, **hyper)
        assert all(_bits_same(r, b) for r, b in zip(grads, before))
    assert calls[0] == 3
    for a, b in zip(p2, p1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in st:
        if k == "max_exp_avg_sq" and not amsgrad:
            assert _same(s2[k], st[k])  # untouched without amsgrad
            continue
        for a, b in zip(s2[k], s1[k]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------- AMP skip


@pytest.mark.parametrize("found", [1.0, 2.0, float("inf")])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_found_inf_step_is_a_bitwise_no_op(found, amsgrad, calls):
    params = _rand()
    st = _state()
    before, st_before = _clone(params), {k: _clone(v) for k, v in st.items()}
    grads = _rand()
    grads[1][3] = float("inf")
    ops.combine_step_(params, [grads], st, rule="adamw", lr=torch.tensor(0.1), grad_scale=torch.tensor(4.0),
                      found_inf=torch.tensor(found), amsgrad=amsgrad, weight_decay=0.1,
                      backend="reference")  # fmt: skip
    assert calls[0] == 1  # the kernel ran, and skipped
    assert _bits_same(params, before)
    for k in st:
        assert _bits_same(st[k], st_before[k]), k


def test_found_inf_zero_steps(calls):
    params = _rand()
    st = _state()
    before, steps_before = _clone(params), _clone(st["step"])
    ops.combine_step_(params, [_rand()], st, rule="adamw", lr=0.1, grad_scale=torch.tensor(4.0),
                      found_inf=torch.tensor(0.0), backend="reference")  # fmt: skip
    assert calls[0] == 1
    assert not _same(params[:1], before[:1])
    assert _same(st["step"], [s + 1 for s in steps_before])


# --------------------------------------------------------------------------- which groups, the switch


def _adamw_step(params, **kw):
    sd = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    st = {"exp_avg": [torch.randn(p.shape, dtype=sd) for p in params],
          "exp_avg_sq": [torch.rand(p.shape, dtype=sd) for p in params],
          "step": [torch.tensor(1.0) for _ in params]}  # fmt: skip
    grads = [torch.randn_like(p) for p in params]
    ops.combine_step_(params, [grads], st, rule="adamw", lr=0.01, backend="reference", **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_never_take_the_kernel(dtype, calls):
    _adamw_step(_rand(dtype))
    assert calls[0] == 0


def test_update_mode_mask_never_takes_the_kernel(calls):
    mask = [pack_bits(torch.rand(s) < 0.5) for s in SHAPES]
    _adamw_step(_rand(), mask=mask, mask_mode="update")
    assert calls[0] == 0
    _adamw_step(_rand(), mask=mask, mask_mode="grad")
    assert calls[0] == 1


def test_only_the_fp32_group_of_a_mixed_list_takes_the_kernel(calls):
    params = [torch.randn(5), torch.randn(4, dtype=torch.float16), torch.randn(3), torch.randn(2, dtype=torch.float64)]
    _adamw_step(params)
    assert calls[0] == 1


def test_no_host_reads_never_take_the_kernel(calls, monkeypatch):
    monkeypatch.setattr(_util, "HOST_READS", False)  # the CPU kernel reads the counters on the host
    _adamw_step(_rand())
    assert calls[0] == 0


def test_switch_scope_and_env(calls, monkeypatch):
    _adamw_step(_rand())
    assert calls[0] == 1  # on by default
    with ref_combine.fused(False):
        _adamw_step(_rand())
    assert calls[0] == 1
    with ref_combine.foreach(False):  # the single-tensor formulation never takes the kernel
        _adamw_step(_rand())
    assert calls[0] == 1
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "0")
    _adamw_step(_rand())
    assert calls[0] == 1
    with ref_combine.fused(True):  # the scope wins over the environment
        _adamw_step(_rand())
        with ref_combine.fused(None):
            _adamw_step(_rand())
    assert calls[0] == 2
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "1")
    _adamw_step(_rand())
    assert calls[0] == 3
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "yes")
    with pytest.raises(ValueError, match="FASTCLU_REFERENCE_FUSED"):
        _adamw_step(_rand())
