"""Reference lerp_sync_ vs. an fp64 formulation."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("slow_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fast_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_lerp_sync(slow_dtype, fast_dtype, as_tensor):
    slow = [torch.randn(s).to(slow_dtype) for s in SHAPES]
    fast = [torch.randn(s).to(fast_dtype) for s in SHAPES]
    beta = float(torch.rand(()))
    s0 = [x.to(torch.float64, copy=True) for x in slow]
    f0 = [x.to(torch.float64, copy=True) for x in fast]
    ops.lerp_sync_(slow, fast, torch.tensor(beta) if as_tensor else beta, backend="reference")
    for s, f, a, b in zip(slow, fast, s0, f0):
        want = a + beta * (b - a)
        torch.testing.assert_close(s.double(), want, rtol=TOL[slow_dtype], atol=TOL[slow_dtype])
        assert torch.equal(f, s.to(fast_dtype))  # fast takes the stored slow exactly


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lerp_sync_low_precision_slow(dtype):
    slow = [torch.randn(9, 3).to(dtype)]
    fast = [torch.randn(9, 3).to(dtype)]
    a, b = slow[0].to(torch.float64, copy=True), fast[0].to(torch.float64, copy=True)
    ops.lerp_sync_(slow, fast, 0.3, backend="reference")
    torch.testing.assert_close(
        slow[0].double(), (a + 0.3 * (b - a)).to(dtype).double(), rtol=TOL[dtype], atol=TOL[dtype]
    )
    assert torch.equal(slow[0], fast[0])


def test_lerp_sync_empty_list():
    ops.lerp_sync_([], [], 0.5, backend="reference")
