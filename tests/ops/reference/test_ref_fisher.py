"""Reference fisher_accumulate_ vs. an fp64 formulation."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_fisher_accumulate(grad_dtype, power, as_tensor):
    state_dtype = torch.float64 if grad_dtype == torch.float64 else torch.float32
    fisher = [torch.rand(s, dtype=state_dtype) for s in SHAPES]
    grads = [torch.randn(s).to(grad_dtype) for s in SHAPES]
    before = [f.to(torch.float64, copy=True) for f in fisher]
    s = float(torch.rand(()) + 0.5)  # fp32-representable: a 0-d fp32 tensor carries it exactly
    ops.fisher_accumulate_(fisher, grads, torch.tensor(s) if as_tensor else s, power=power, backend="reference")
    for f, f0, g in zip(fisher, before, grads):
        g64 = g.double()
        term = g64 * g64 if power == 2 else g64.abs()
        torch.testing.assert_close(f.double(), f0 + s * term, rtol=TOL[state_dtype], atol=TOL[state_dtype])


def test_fisher_accumulates_over_calls():
    fisher = [torch.zeros(40)]
    gs = [torch.randn(40) for _ in range(5)]
    for g in gs:
        ops.fisher_accumulate_(fisher, [g], 0.2, backend="reference")
    want = sum(0.2 * g.double() ** 2 for g in gs)
    torch.testing.assert_close(fisher[0].double(), want, rtol=1e-6, atol=1e-7)


def test_fisher_empty_list():
    ops.fisher_accumulate_([], [], 1.0, backend="reference")
