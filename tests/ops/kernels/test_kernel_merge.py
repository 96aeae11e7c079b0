"""merge_ and merge_stats (P&M) kernels against the reference and an fp64 formulation."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import (
    BACKENDS,
    BIG,
    DEVICE,
    FLOATS,
    SIZES,
    assert_close,
    clone,
    many_sizes,
    need,
    poison_alloc,  # noqa: F401
    rand,
    randn,
)

from fastclu.ops import merge_, merge_stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_merge_matches_reference(backend: str, dtype: torch.dtype) -> None:
    need(backend)
    params, anchor = randn(SIZES, dtype), randn(SIZES, dtype)
    got, want = clone(params), clone(params)
    merge_(got, anchor, 0.6, backend=backend)
    merge_(want, anchor, 0.6, backend="reference")
    assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_tensor_alpha(backend: str) -> None:
    need(backend)
    params, anchor = randn([4097, 7]), randn([4097, 7])
    alpha = torch.tensor(0.25, device=DEVICE)
    got, want = clone(params), clone(params)
    merge_(got, anchor, alpha, backend=backend)
    merge_(want, anchor, alpha, backend="reference")
    assert_close(got, want, torch.float32)


def _stats_case(backend: str, sizes: list[int], dtype: torch.dtype) -> None:
    params, anchor = randn(sizes, dtype), randn(sizes, dtype)
    fs = rand(sizes)
    fts = randn(sizes)
    num, den = merge_stats(params, anchor, fs, fts, backend=backend)
    rnum, rden = merge_stats(params, anchor, fs, fts, backend="reference")
    assert num.dtype == den.dtype == torch.float32 and num.shape == den.shape == ()
    # independent fp64 sums; the tolerance is relative to the sum of |terms| (cancellation)
    d = [p.double() - a.double() for p, a in zip(params, anchor)]
    terms_n = [x * (t.double() - a.double() * f.double()) for x, t, a, f in zip(d, fts, anchor, fs)]
    terms_d = [x * x * f.double() for x, f in zip(d, fs)]
    for got, ref, terms in ((num, rnum, terms_n), (den, rden, terms_d)):
        mag = sum(float(t.abs().sum()) for t in terms)
        exact = sum(float(t.sum()) for t in terms)
        assert abs(float(got) - exact) <= 1e-6 * mag + 1e-30, (float(got), exact)
        assert abs(float(got) - float(ref)) <= 1e-6 * mag + 1e-30


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_merge_stats_matches_reference(backend: str, dtype: torch.dtype, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _stats_case(backend, SIZES, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_stats_big_and_many(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _stats_case(backend, [BIG, *many_sizes(60)], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_stats_all_empty(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    z = [torch.empty(0, device=DEVICE)]
    num, den = merge_stats(z, z, z, z, backend=backend)
    assert float(num) == 0.0 and float(den) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_stats_deterministic(backend: str) -> None:
    need(backend)
    params, anchor, fs, fts = randn([9000, 5]), randn([9000, 5]), rand([9000, 5]), randn([9000, 5])
    a = merge_stats(params, anchor, fs, fts, backend=backend)
    b = merge_stats(params, anchor, fs, fts, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
