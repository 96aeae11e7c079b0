"""lerp_sync_ (fast-slow sync) kernels against the reference."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import BACKENDS, DEVICE, FLOATS, HAS_GPU, SIZES, assert_close, clone, need, randn

from fastclu.ops import lerp_sync_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fast_dtype", FLOATS)
@pytest.mark.parametrize("slow_dtype", [torch.float32, torch.bfloat16])
def test_lerp_sync_matches_reference(backend: str, fast_dtype: torch.dtype, slow_dtype: torch.dtype) -> None:
    need(backend)
    slow, fast = randn(SIZES, slow_dtype), randn(SIZES, fast_dtype)
    s_got, f_got, s_want, f_want = clone(slow), clone(fast), clone(slow), clone(fast)
    lerp_sync_(s_got, f_got, 0.3, backend=backend)
    lerp_sync_(s_want, f_want, 0.3, backend="reference")
    assert_close(s_got, s_want, slow_dtype)
    # fast takes slow's stored value: one rounding of slow's dtype, then fast's own
    worst = max((slow_dtype, fast_dtype), key=lambda d: torch.finfo(d).eps)
    assert_close(f_got, f_want, worst)
    for s, f in zip(s_got, f_got):
        # exact on a GPU and in the cuda backend's CPU mode (its casts round to nearest even)
        if HAS_GPU or backend == "cuda" or torch.finfo(fast_dtype).eps <= torch.finfo(slow_dtype).eps:
            assert torch.equal(f, s.to(fast_dtype)), "fast must equal the stored slow weights"
        else:  # the interpreter narrows by truncation: allow one ulp of fast's dtype
            assert_close(f, s.to(fast_dtype), fast_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lerp_sync_tensor_beta(backend: str) -> None:
    need(backend)
    slow, fast = randn([7, 4097]), randn([7, 4097])
    beta = torch.tensor(0.75, device=DEVICE)
    s_got, f_got, s_want, f_want = clone(slow), clone(fast), clone(slow), clone(fast)
    lerp_sync_(s_got, f_got, beta, backend=backend)
    lerp_sync_(s_want, f_want, beta, backend="reference")
    assert_close(s_got, s_want, torch.float32)
    assert_close(f_got, f_want, torch.float32)
