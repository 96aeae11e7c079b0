"""perturb_ / restore_ kernels against the reference; the Philox stream bit for bit."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import (
    BACKENDS,
    DEVICE,
    FLOATS,
    HAS_GPU,
    SIZES,
    TRITON,
    assert_close,
    assert_equal,
    clone,
    need,
    poison_alloc,  # noqa: F401
    poisoned_like,
    randn,
)

from fastclu.ops import perturb_, restore_
from fastclu.ops.reference.philox import philox_normal, philox_words

# sizes with 2-D shapes (rows of 7) so the per-row noise scaling is exercised
ROWS = [1, 7, 4097, 0, 49, 700]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("source", ["anchor", "direction"])
def test_perturb_vector_matches_reference(backend: str, dtype: torch.dtype, source: str) -> None:
    need(backend)
    params, src = randn(SIZES, dtype), randn(SIZES, dtype)
    got, want = clone(params), clone(params)
    b_got, b_want = poisoned_like(params), poisoned_like(params)
    kw = {source: src}
    assert perturb_(got, 0.5, backup=b_got, backend=backend, **kw) is None
    perturb_(want, 0.5, backup=b_want, backend="reference", **kw)
    assert_close(got, want, dtype)
    assert_equal(b_got, params)  # the clean weights, bit for bit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_perturb_noise_matches_reference(backend: str, dtype: torch.dtype, poison_alloc) -> None:  # noqa: F811
    need(backend)
    params = randn(ROWS, dtype)
    seed = int(torch.randint(0, 2**62, ()))
    scale = torch.tensor(0.3, device=DEVICE)
    got, want = clone(params), clone(params)
    b_got = poisoned_like(params)
    n_got = perturb_(got, scale, seed=seed, backup=b_got, backend=backend)
    n_want = perturb_(want, scale, seed=seed, backend="reference")
    assert_close(n_got, n_want, torch.float32)
    # the noise is a few ulp off (log/cos/sqrt; the GPU's are approximations, as in tl.randn);
    # the sum is rounded once to dtype
    assert_close(got, want, dtype, scale=8.0 if HAS_GPU else 2.0)
    assert_equal(b_got, params)
    # regenerate the same noise from the returned norms and remove it
    perturb_(got, -scale, seed=seed, row_norms=n_got, backend=backend)
    assert_close(got, params, dtype, scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_restore_bit_exact(backend: str, dtype: torch.dtype) -> None:
    need(backend)
    backup = randn([*SIZES, 33], dtype)
    backup[-1][3] = float("nan")
    backup[-1][4] = -0.0
    params = randn([*SIZES, 33], dtype)
    restore_(params, backup, backend=backend)
    for p, b in zip(params, backup):
        assert torch.equal(p.view(torch.uint8) if p.numel() else p, b.view(torch.uint8) if b.numel() else b)


@TRITON
@pytest.mark.parametrize("seed", [0, 2**64 - 1, 0x1234_5678_9ABC_DEF0])
def test_triton_philox_words_bit_exact(seed: int) -> None:
    from fastclu.ops.triton.perturb import philox_normal_stream, philox_stream

    # starts whose end crosses 2**31 and 2**32: the stream position must not wrap in 32 bits
    for index, start in ((0, 0), (3, 2**32 - 100), (5, 2**31 - 100), (199, 12345)):
        words = philox_stream(seed, index, start, 300, device=DEVICE)
        ref = torch.stack(philox_words(seed, index, start, 300, device=DEVICE), dim=1)
        assert torch.equal(words, ref)
        z = philox_normal_stream(seed, index, 300, device=DEVICE, start=start)
        tol = 2e-5 if HAS_GPU else 2e-6  # GPU log/cos are approximations (as in tl.randn)
        torch.testing.assert_close(z, philox_normal(seed, index, 300, device=DEVICE, start=start), rtol=tol, atol=tol)
