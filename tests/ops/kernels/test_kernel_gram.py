"""gram kernels against the reference and an fp64 formulation; determinism; masked inf/NaN."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import (
    BACKENDS,
    BIG,
    FLOATS,
    SIZES,
    many_sizes,
    need,
    poison_alloc,  # noqa: F401
    randn,
    random_masks,
)

from fastclu.ops import gram, unpack_bits


def _fp64_gram(grads, mask, masked) -> torch.Tensor:
    R = len(grads)
    G = torch.zeros(R, R, dtype=torch.float64)
    for i in range(len(grads[0])):
        n = grads[0][i].numel()
        rows = []
        for r in range(R):
            g = grads[r][i].reshape(-1).double().cpu()
            if mask is not None and masked[r]:
                g = torch.where(unpack_bits(mask[i].cpu(), n), g, torch.zeros((), dtype=torch.float64))
            rows.append(g)
        v = torch.stack(rows)
        G += v @ v.T
    return G


def _check(backend: str, sizes, dtype, R: int, use_mask: bool, masked) -> None:
    grads = [randn(sizes, dtype) for _ in range(R)]
    mask = random_masks(sizes) if use_mask else None
    flags = masked if masked is not None else [use_mask] * R
    if use_mask:
        # inf under a 0 bit of a gated role must not leak into the result
        for i, s in enumerate(sizes):
            if s:
                bits = unpack_bits(mask[i], s)
                hidden = (~bits).nonzero()
                if hidden.numel() and flags[0]:
                    grads[0][i].view(-1)[hidden[0]] = float("inf")
    got = gram(grads, mask=mask, masked=masked, backend=backend)
    want = gram(grads, mask=mask, masked=masked, backend="reference")
    exact = _fp64_gram(grads, mask, flags)
    assert got.shape == (R, R) and got.dtype == torch.float32
    assert torch.equal(got, got.T), "gram must be exactly symmetric"
    diag = exact.diagonal().sqrt()
    bound = 1e-6 * (diag[:, None] * diag[None, :]) + 1e-30  # Cauchy-Schwarz scale of each entry
    assert ((got.double().cpu() - exact).abs() <= bound).all(), (got, exact)
    assert ((got.double() - want.double()).abs().cpu() <= bound).all(), (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("R", [1, 2, 3, 4])
def test_gram_matches_reference(backend: str, dtype: torch.dtype, R: int, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _check(backend, SIZES, dtype, R, use_mask=False, masked=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [None, [True, False, True], [False, True, False]])
def test_gram_masked(backend: str, masked, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _check(backend, SIZES, torch.float32, 3, use_mask=True, masked=masked)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_big_and_many(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _check(backend, [BIG, *many_sizes(100)], torch.float32, 2, use_mask=True, masked=[True, False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_one_tensor(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _check(backend, [4097], torch.float16, 4, use_mask=True, masked=[True, True, False, False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_deterministic(backend: str) -> None:
    need(backend)
    grads = [randn([9001, 3]) for _ in range(3)]
    assert torch.equal(gram(grads, backend=backend), gram(grads, backend=backend))
