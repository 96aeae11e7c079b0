"""Reference fd_hvp_ vs. an fp64 formulation; the output is poisoned before a plain write."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]
TOL = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_fd_hvp(grad_dtype, accumulate, as_tensor):
    out_dtype = torch.float64 if grad_dtype == torch.float64 else torch.float32
    gp = [torch.randn(s).to(grad_dtype) for s in SHAPES]
    gm = [torch.randn(s).to(grad_dtype) for s in SHAPES]
    if accumulate:
        out = [torch.randn(s, dtype=out_dtype) for s in SHAPES]
    else:
        out = [torch.full(s, float("nan"), dtype=out_dtype) for s in SHAPES]
    before = [o.to(torch.float64, copy=True) for o in out]
    eps = float(torch.rand(()) * 1e-2 + 1e-3)  # fp32-representable, as a 0-d fp32 tensor holds it
    ops.fd_hvp_(out, gp, gm, torch.tensor(eps) if as_tensor else eps, accumulate=accumulate, backend="reference")
    for o, o0, p, m in zip(out, before, gp, gm):
        h = (p.double() - m.double()) / (2 * eps)
        want = o0 + h if accumulate else h
        # Relative to |h|: the difference of rounded gradients is divided by a small eps.
        tol = TOL[out_dtype] * (1 + h.abs().max().item() if h.numel() else 1)
        torch.testing.assert_close(o.double(), want, rtol=TOL[out_dtype], atol=tol)


def test_fd_hvp_low_precision_out():
    out = [torch.full((6, 7), float("nan"), dtype=torch.bfloat16)]
    gp, gm = [torch.randn(6, 7)], [torch.randn(6, 7)]
    ops.fd_hvp_(out, gp, gm, 0.5, backend="reference")
    want = (gp[0].double() - gm[0].double()).to(torch.bfloat16).double()
    torch.testing.assert_close(out[0].double(), want, rtol=8e-3, atol=8e-3)


def test_fd_hvp_empty_list():
    ops.fd_hvp_([], [], [], 0.1, backend="reference")
