"""Kernel numerics as torch's at the edges: AMSGrad's max propagates NaN, a step counter at a
multiple of 2**32 gives finite bias corrections. Each backend against the reference."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import BACKENDS, DEVICE

from fastclu.ops import combine_step_


def _adamw(backend: str, grad: torch.Tensor, step: float, amsgrad: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    p = torch.randn(grad.numel(), device=DEVICE)
    st = {
        "step": [torch.tensor(step, device=DEVICE)],
        "exp_avg": [torch.randn_like(p) * 0.1],
        "exp_avg_sq": [torch.rand_like(p) * 0.1],
    }
    if amsgrad:
        st["max_exp_avg_sq"] = [torch.rand_like(p) * 0.1]
    combine_step_([p], [[grad.to(DEVICE)]], st, rule="adamw", lr=1e-2, weight_decay=1e-2, amsgrad=amsgrad,
                  betas=(0.9, 0.999), eps=1e-8, backend=backend)  # fmt: skip
    return {"param": p, **{k: v[0] for k, v in st.items()}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_max_propagates_nan(backend: str) -> None:
    g = torch.randn(37)
    g[[3, 20]] = float("nan")
    out = _adamw(backend, g, 4.0, amsgrad=True)
    ref = _adamw("reference", g, 4.0, amsgrad=True)
    nan = torch.isnan(ref["max_exp_avg_sq"])
    assert nan[[3, 20]].all() and nan.sum() == 2  # the reference (torch.maximum) keeps the NaN
    assert torch.equal(torch.isnan(out["max_exp_avg_sq"]), nan)
    assert torch.equal(torch.isnan(out["param"]), torch.isnan(ref["param"]))
    keep = ~nan
    torch.testing.assert_close(out["max_exp_avg_sq"][keep], ref["max_exp_avg_sq"][keep])


@pytest.mark.parametrize("step", [2.0**32 - 1, 2.0**32, 2.0**33, 3 * 2.0**32, 2.0**70])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_step_counter_beyond_2_to_32(backend: str, step: float) -> None:
    g = torch.randn(19)
    out = _adamw(backend, g, step, amsgrad=False)
    ref = _adamw("reference", g, step, amsgrad=False)
    assert torch.isfinite(ref["param"]).all()
    assert torch.isfinite(out["param"]).all()
    torch.testing.assert_close(out["param"], ref["param"])
    assert float(out["step"]) == float(ref["step"])
