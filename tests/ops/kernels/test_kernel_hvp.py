"""fd_hvp_ (central finite difference) kernels against the reference."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import BACKENDS, DEVICE, FLOATS, SIZES, assert_close, clone, need, poisoned_like, randn

from fastclu.ops import fd_hvp_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_fd_hvp_matches_reference(backend: str, dtype: torch.dtype) -> None:
    need(backend)
    gp, gm = randn(SIZES, dtype), randn(SIZES, dtype)
    # out is never read without accumulate: NaN there must not survive
    got, want = poisoned_like(randn(SIZES, dtype)), poisoned_like(randn(SIZES, dtype))
    fd_hvp_(got, gp, gm, 0.01, backend=backend)
    fd_hvp_(want, gp, gm, 0.01, backend="reference")
    # values are O(100): scale the tolerance with them
    assert_close(got, want, dtype, scale=100.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fd_hvp_accumulate_tensor_eps(backend: str) -> None:
    need(backend)
    sizes = [7, 4097, 1]
    gp, gm, out = randn(sizes), randn(sizes), randn(sizes)
    eps = torch.tensor(0.25, device=DEVICE)
    got, want = clone(out), clone(out)
    fd_hvp_(got, gp, gm, eps, accumulate=True, backend=backend)
    fd_hvp_(want, gp, gm, eps, accumulate=True, backend="reference")
    assert_close(got, want, torch.float32, scale=4.0)
