"""Reference merge_stats / merge_ vs. an fp64 formulation over the concatenated tensors."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _cat(xs):
    return torch.cat([x.double().flatten() for x in xs])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_merge_stats(dtype):
    params = [torch.randn(s).to(dtype) for s in SHAPES]
    anchor = [torch.randn(s).to(dtype) for s in SHAPES]
    fs = [torch.rand(s) + 0.1 for s in SHAPES]
    fts = [torch.randn(s) for s in SHAPES]
    num, den = ops.merge_stats(params, anchor, fs, fts, backend="reference")
    assert num.shape == () and den.shape == () and num.dtype == den.dtype == torch.float32
    p, a, f, ft = _cat(params), _cat(anchor), _cat(fs), _cat(fts)
    d = p - a
    torch.testing.assert_close(num.double(), (d * (ft - a * f)).sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(den.double(), (d.square() * f).sum(), rtol=1e-6, atol=1e-6)


def test_merge_stats_empty():
    num, den = ops.merge_stats([], [], [], [], backend="reference")
    assert float(num) == 0.0 and float(den) == 0.0 and num.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_merge(dtype, as_tensor):
    params = [torch.randn(s).to(dtype) for s in SHAPES]
    anchor = [torch.randn(s).to(dtype) for s in SHAPES]
    alpha = float(torch.rand(()))
    before = [p.to(torch.float64, copy=True) for p in params]
    ops.merge_(params, anchor, torch.tensor(alpha) if as_tensor else alpha, backend="reference")
    for p, p0, a in zip(params, before, anchor):
        want = (a.double() + alpha * (p0 - a.double())).to(dtype).double()
        torch.testing.assert_close(p.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
