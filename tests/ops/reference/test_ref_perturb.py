"""Reference perturb_ / restore_: fp64 formulation of each mode, bit-exact round trips, noise scaling."""

from __future__ import annotations

import math

import pytest
import torch

from fastclu import ops
from fastclu.ops.reference.philox import philox_normal

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (0, 3), (2, 3, 4), (1, 65)]
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bit patterns, so that -0.0 vs +0.0 or NaN payloads would count as differences.
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def _params(dtype):
    return [torch.randn(s).to(dtype) for s in SHAPES]


def _close(actual, want64, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    torch.testing.assert_close(actual.double(), want64.to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["anchor", "direction"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_perturb_given_direction(dtype, mode, as_tensor):
    params = _params(dtype)
    other = [torch.randn(s).to(dtype) for s in SHAPES]
    clean = [p.clone() for p in params]
    backup = [torch.full_like(p, float("nan")) for p in params]
    s = float(torch.randn(()))
    scale = torch.tensor(s) if as_tensor else s
    out = ops.perturb_(params, scale, backup=backup, backend="reference", **{mode: other})
    assert out is None
    for p, p0, b, o in zip(params, clean, backup, other):
        assert _bits_equal(b, p0)
        d = p0.double() - o.double() if mode == "anchor" else o.double()
        _close(p, p0.double() + s * d, dtype)
    ops.restore_(params, backup, backend="reference")
    assert all(_bits_equal(p, p0) for p, p0 in zip(params, clean))


def _rows(shape):
    return shape[0] if len(shape) >= 2 else 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_seed_matches_fp64_noise_formula(dtype):
    params = _params(dtype)
    clean = [p.clone() for p in params]
    backup = [torch.full_like(p, float("nan")) for p in params]
    seed = int(torch.randint(0, 2**62, ()))
    s = 0.37
    norms = ops.perturb_(params, s, backup=backup, seed=seed, backend="reference")
    assert len(norms) == len(params)
    for i, (p, p0, b, nrm) in enumerate(zip(params, clean, backup, norms)):
        assert _bits_equal(b, p0)
        rows = _rows(p0.shape)
        assert nrm.dtype == torch.float32 and nrm.numel() == rows
        n = math.prod(p0.shape[1:]) if p0.dim() >= 2 else p0.numel()
        x = p0.double().reshape(rows, n)
        want_norm = x.square().sum(dim=1).sqrt()
        torch.testing.assert_close(nrm.double(), want_norm, rtol=1e-6, atol=0)
        if p0.numel() == 0:
            continue
        z = philox_normal(seed, i, p0.numel()).double().reshape(rows, n)
        want = x + s * z * (want_norm / math.sqrt(n)).reshape(rows, 1)
        # The noise is fp32 by contract (fp32 normals and row norms), even for fp64 weights.
        _close(p, want.reshape(p0.shape), dtype, tol=max(TOL[dtype], 2e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_restore_round_trip_bit_exact(dtype):
    params = _params(dtype)
    clean = [p.clone() for p in params]
    backup = [torch.full_like(p, float("nan")) for p in params]
    ops.perturb_(params, 0.5, backup=backup, seed=1234, backend="reference")
    assert any(not _bits_equal(p, p0) for p, p0 in zip(params, clean) if p.numel())
    ops.restore_(params, backup, backend="reference")
    assert all(_bits_equal(p, p0) for p, p0 in zip(params, clean))


def test_noise_row_scaling():
    # Rows with very different norms: the added noise's RMS per row must follow ||row|| / sqrt(n).
    n = 4096
    row_scale = torch.tensor([1e-3, 1.0, 50.0]).reshape(3, 1)
    w = torch.randn(3, n) * row_scale
    w0 = w.clone()
    norms = ops.perturb_([w], 1.0, seed=7, backend="reference")[0]
    rms = (w.double() - w0.double()).square().mean(dim=1).sqrt()
    sigma = w0.double().norm(dim=1) / math.sqrt(n)
    torch.testing.assert_close(norms.double(), w0.double().norm(dim=1), rtol=1e-6, atol=0)
    ratio = rms / sigma
    assert ((ratio > 0.93) & (ratio < 1.07)).all(), ratio  # ~1 +- 5 sigma for n = 4096


def test_noise_differs_per_tensor_and_seed():
    a, b = torch.ones(64), torch.ones(64)
    ops.perturb_([a, b], 1.0, seed=5, backend="reference")
    c = torch.ones(64)
    ops.perturb_([c], 1.0, seed=6, backend="reference")
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_regenerate_and_subtract_noise():
    # Memory-saving removal: same seed and row norms with -scale undo the move to about an ulp.
    params = [torch.randn(5, 33), torch.randn(17)]
    clean = [p.clone() for p in params]
    norms = ops.perturb_(params, 0.2, seed=99, backend="reference")
    ops.perturb_(params, -0.2, seed=99, row_norms=norms, backend="reference")
    for p, p0 in zip(params, clean):
        torch.testing.assert_close(p, p0, rtol=1e-6, atol=1e-6)


def test_given_row_norms_are_used():
    p = torch.randn(4, 8)
    p0 = p.clone()
    given = torch.rand(4) + 0.5
    out = ops.perturb_([p], 1.0, seed=3, row_norms=[given], backend="reference")
    torch.testing.assert_close(out[0], given)
    z = philox_normal(3, 0, 32).double().reshape(4, 8)
    want = p0.double() + z * (given.double() / math.sqrt(8)).reshape(4, 1)
    torch.testing.assert_close(p.double(), want.float().double(), rtol=2e-6, atol=2e-6)


def test_perturb_empty_list():
    assert ops.perturb_([], 1.0, seed=1, backend="reference") == []
    assert ops.perturb_([], 1.0, direction=[], backend="reference") is None
    ops.restore_([], [], backend="reference")
