"""PyTorch's own OptimizerInfo cases (``torch.testing._internal.common_optimizers.optim_db``)
driven through fastclu's SGD and AdamW, the optimizer class swapped in.

* every ``optim_inputs_func`` case (CPU, float32/float64, foreach None/False/True): fastclu's
  trajectory equals torch's single-tensor one, and its state_dict loads into torch's and back;
* every ``optim_inputs_func`` case on complex64 parameters (stepped as real views, as torch does):
  the same trajectory as torch's, and state_dicts (complex state) that cross over both ways;
* every ``optim_error_inputs_func`` case: the same error type and message as torch;
* the contract items torch's test_optim checks that the cases do not cover (deepcopy/pickle,
  numpy hyper-parameters, non-parameter state entries, load_state_dict hooks, meta devices,
  ``.grad`` after ``GradScaler.step``).

Expected failures, by design (the README's "What stays different from torch, by design"), are
the ``BY_DESIGN`` list below: each is asserted to still be refused with a clear error, so the
list cannot silently go stale.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from _optim_db import INFOS, OURS, TORCH, OptimizerErrorEnum

import fastclu.optim


def _cases() -> list:
    out = []
    for name, info in INFOS.items():
        for dtype in (torch.float32, torch.float64):
            for i, case in enumerate(info.optim_inputs_func(device="cpu", dtype=dtype)):
                for foreach in (None, False, True):
                    out.append(pytest.param(name, dtype, case, foreach, id=f"{name}-{dtype}-{i}-{case.desc}-{foreach}"))
    return out


def _model(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)
    return m, torch.randn(6, 5, dtype=dtype)


def _clone_kwargs(kwargs: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@pytest.mark.parametrize(("name", "dtype", "case", "foreach"), _cases())
def test_optim_inputs_match_torch(name: str, dtype: torch.dtype, case: object, foreach: bool | None) -> None:
    kwargs = dict(case.kwargs)
    if isinstance(kwargs.get("lr"), torch.Tensor) and foreach and name == "AdamW":
        pytest.skip("torch refuses a tensor lr with foreach=True (checked in test_error_inputs_match_torch)")
    m_ref, x = _model(dtype)
    m_our, _ = _model(dtype)
    ref = TORCH[name](m_ref.parameters(), **_clone_kwargs(kwargs), foreach=False)
    ours = OURS[name](m_our.parameters(), **_clone_kwargs(kwargs), foreach=foreach)
    for _ in range(4):
        for m, o in ((m_ref, ref), (m_our, ours)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(m_our.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    # state_dicts cross over both ways
    ref2 = TORCH[name](m_ref.parameters(), **_clone_kwargs(kwargs), foreach=False)
    ref2.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())


def _complex_cases() -> list:
    out = []
    for name, info in INFOS.items():
        for i, case in enumerate(info.optim_inputs_func(device="cpu", dtype=torch.float32)):
            out.append(pytest.param(name, case, id=f"{name}-complex64-{i}-{case.desc}"))
    return out


def _complex_params() -> tuple[list[torch.nn.Parameter], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 5, dtype=torch.complex64, generator=g)),
          torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, generator=g))]  # fmt: skip
    return ps, torch.randn(6, 5, dtype=torch.complex64, generator=g)


@pytest.mark.parametrize(("name", "case"), _complex_cases())
def test_optim_inputs_complex_match_torch(name: str, case: object) -> None:
    """Every case on complex parameters (torch steps them as real views; so does fastclu)."""
    kwargs = dict(case.kwargs)
    ps_ref, x = _complex_params()
    ps_our, _ = _complex_params()
    ref = TORCH[name](ps_ref, **_clone_kwargs(kwargs), foreach=False)
    ours = OURS[name](ps_our, **_clone_kwargs(kwargs))
    for _ in range(4):
        for (w, b), o in ((ps_ref, ref), (ps_our, ours)):
            o.zero_grad()
            (x @ w.T + b).abs().pow(2).sum().backward()
            o.step()
    for a, b in zip(ps_our, ps_ref):
        assert a.dtype == torch.complex64
        # SGD: torch's single-tensor path uses complex arithmetic (rounding); AdamW views as real
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 if name == "SGD" else 0)
    ref2 = TORCH[name](ps_ref, **_clone_kwargs(kwargs), foreach=False)
    ref2.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
    for p in ps_our:
        for k, v in ours.state[p].items():
            if k != "step":
                assert v.dtype == torch.complex64, k  # complex state, torch's layout


def _error_cases() -> list:
    out = []
    for name, info in INFOS.items():
        for i, e in enumerate(info.optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            out.append(pytest.param(name, e, id=f"{name}-{i}-{e.error_type.__name__}"))
    return out


@pytest.mark.parametrize(("name", "err"), _error_cases())
def test_error_inputs_match_torch(name: str, err: object) -> None:
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2, 2))]

    def build() -> None:
        opt = OURS[name](params, **inp.kwargs)
        if err.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=err.error_regex):
            build()
    else:
        with pytest.raises(err.error_type, match=err.error_regex):
            build()


def test_deepcopy_and_pickle_keep_the_backend() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    for cls in OURS.values():
        opt = cls([p], lr=0.1, backend="reference")
        assert copy.deepcopy(opt).backend == "reference"
        assert pickle.loads(pickle.dumps(opt)).backend == "reference"


def test_numpy_hyperparameters() -> None:
    for name, cls in OURS.items():
        m_ref, x = _model(torch.float32)
        m_our, _ = _model(torch.float32)
        ref = TORCH[name](m_ref.parameters(), lr=0.05, foreach=False)
        ours = cls(m_our.parameters(), lr=np.float32(0.05))
        ref.param_groups[0]["lr"] = float(np.float32(0.05))
        for m, o in ((m_ref, ref), (m_our, ours)):
            m(x).sum().backward()
            o.step()
        for a, b in zip(m_our.parameters(), m_ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_non_parameter_state_entries_are_tolerated() -> None:
    m, x = _model(torch.float32)
    for cls in OURS.values():
        opt = cls(m.parameters(), lr=0.1)
        opt.state["note"] = {"epoch": 3}
        m(x).sum().backward()
        opt.step()
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        assert opt.state["note"] == {"epoch": 3}


def test_sgd_steps_meta_device_params() -> None:
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    fastclu.optim.SGD([p], lr=0.1, momentum=0.9).step()


def test_adamw_steps_meta_device_params() -> None:
    # Formerly by design (the reference AdamW read its step counter on the host); every
    # optim_db case on meta tensors is in tests/optim/test_meta_device.py.
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    opt = fastclu.optim.AdamW([p], lr=0.1, amsgrad=True)
    opt.step()
    assert opt.state[p]["step"].device.type == "meta" and opt.state[p]["exp_avg"].shape == (3,)


def test_grad_left_unscaled_after_grad_scaler_step() -> None:
    for name, cls in OURS.items():
        m_ref, x = _model(torch.float32)
        m_our, _ = _model(torch.float32)
        ref = TORCH[name](m_ref.parameters(), lr=0.1, fused=True)
        ours = cls(m_our.parameters(), lr=0.1)
        for m, o in ((m_ref, ref), (m_our, ours)):
            sc = torch.amp.GradScaler("cpu", init_scale=64.0)
            sc.scale(m(x).sum()).backward()
            sc.step(o)
            sc.update()
        for a, b in zip(m_our.parameters(), m_ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# (case, reason): each still refused with a clear error, as documented.
BY_DESIGN = [
    ("differentiable", "no autograd through the fused step: differentiable=True is refused"),
    ("sparse", "fused kernels take dense gradients only: a sparse .grad is refused"),
    ("complex32", "complex32 parameters are refused (complex64/complex128 step as real views, as torch's)"),
    ("low_precision_state", "optimizer state is fp32 for fp16/bf16 params (torch keeps it in the param dtype)"),
]


@pytest.mark.parametrize(("case", "reason"), BY_DESIGN, ids=[c for c, _ in BY_DESIGN])
def test_by_design_differences(case: str, reason: str) -> None:
    p = torch.nn.Parameter(torch.randn(3))
    if case == "differentiable":
        for cls in OURS.values():
            with pytest.raises(ValueError, match="differentiable"):
                cls([p], lr=0.1, differentiable=True)
    elif case == "sparse":
        for cls in OURS.values():
            q = torch.nn.Parameter(torch.randn(3))
            q.grad = torch.randn(3).to_sparse()
            with pytest.raises(TypeError, match="sparse"):
                cls([q], lr=0.1).step()
    elif case == "complex32":
        for cls in OURS.values():
            with warnings.catch_warnings(), pytest.raises(TypeError, match="complex32"):
                warnings.simplefilter("ignore")  # torch: "ComplexHalf support is experimental"
                cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64).to(torch.complex32))], lr=0.1)
    elif case == "low_precision_state":
        q = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
        q.grad = torch.randn(3, dtype=torch.bfloat16)
        opt = fastclu.optim.AdamW([q], lr=0.1)
        opt.step()
        assert opt.state[q]["exp_avg"].dtype == torch.float32
    assert reason
