"""Reference gram vs. an fp64 formulation over the concatenated, masked role gradients."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops

SHAPES = [(), (1,), (0,), (7,), (3, 5), (4, 0), (2, 3, 4), (65,)]


def _grads(n_roles: int, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    return [[torch.randn(s).to(dtype) for s in SHAPES] for _ in range(n_roles)]


def _expected(grads, keep, masked) -> torch.Tensor:
    flat = []
    for r, role in enumerate(grads):
        v = torch.cat([g.double().flatten() for g in role])
        if masked[r]:
            v = v * keep.double()
        flat.append(v)
    n = len(flat)
    return torch.tensor([[float((flat[r] * flat[s]).sum()) for s in range(n)] for r in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_roles", [1, 2, 3, 4])
def test_gram_unmasked(dtype, n_roles):
    grads = _grads(n_roles, dtype)
    g = ops.gram(grads, backend="reference")
    assert g.dtype == torch.float32 and g.shape == (n_roles, n_roles)
    want = _expected(grads, None, [False] * n_roles)
    torch.testing.assert_close(g.double(), want, rtol=2e-6, atol=1e-5)
    assert torch.equal(g, g.T)


@pytest.mark.parametrize("n_roles", [2, 4])
def test_gram_masked_subset(n_roles):
    grads = _grads(n_roles, torch.float32)
    bools = [torch.rand(s) < 0.5 for s in SHAPES]
    mask = [ops.pack_bits(b) for b in bools]
    keep = torch.cat([b.flatten() for b in bools])
    masked = [r % 2 == 0 for r in range(n_roles)]
    g = ops.gram(grads, mask=mask, masked=masked, backend="reference")
    torch.testing.assert_close(g.double(), _expected(grads, keep, masked), rtol=2e-6, atol=1e-5)
    # Default flags with a mask: every role is masked.
    g_all = ops.gram(grads, mask=mask, backend="reference")
    torch.testing.assert_close(g_all.double(), _expected(grads, keep, [True] * n_roles), rtol=2e-6, atol=1e-5)


def test_gram_masked_out_inf_does_not_leak():
    g = torch.randn(20)
    g[3] = float("inf")
    bools = torch.ones(20, dtype=torch.bool)
    bools[3] = False
    out = ops.gram([[g], [g.clone()]], mask=[ops.pack_bits(bools)], backend="reference")
    assert torch.isfinite(out).all()
    want = float((g[bools].double() ** 2).sum())
    torch.testing.assert_close(out.double(), torch.full((2, 2), want, dtype=torch.float64), rtol=2e-6, atol=0)


def test_gram_empty_list():
    out = ops.gram([[], []], backend="reference")
    assert out.shape == (2, 2) and out.dtype == torch.float32 and not out.any()
