"""Reference gram vs. an fp64 formulation over the concatenated, masked role gradients."""

from __future__ import annotations

import pytest
import torch

from fastclu import ops
from fastclu.ops.reference import _util

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


def _two_role_step(grads, mask, params, st):
    ops.combine_step_(params, grads, st, rule="adamw", lr=0.01, coeffs=[1.0, -1.0], mask=mask, masked=[False, True],
                      scale=torch.tensor(0.5), weight_decay=0.1, backend="reference")  # fmt: skip


def _adamw_state():
    return {"exp_avg": [torch.randn(s) for s in SHAPES], "exp_avg_sq": [torch.rand(s) for s in SHAPES],
            "step": [torch.tensor(3.0) for _ in SHAPES]}  # fmt: skip


def test_gram_hands_its_selection_to_the_combine_of_the_same_gradients(monkeypatch):
    # gram leaves its selection of the masked role; the step takes it instead of selecting again:
    # the same numbers as a step alone, a gradient written in between is never served stale, and
    # the step's in-place sum does not reach a later gram.
    grads = _grads(2, torch.float32)
    bools = [torch.rand(s) < 0.5 for s in SHAPES]
    mask = [ops.pack_bits(b) for b in bools]
    params = _grads(1, torch.float32)[0]
    st = _adamw_state()
    p_alone, st_alone = [p.clone() for p in params], {k: [x.clone() for x in v] for k, v in st.items()}
    _two_role_step(grads, mask, p_alone, st_alone)

    selects = []
    real_select = _util.select
    monkeypatch.setattr(_util, "select", lambda x, w: selects.append(1) or real_select(x, w))
    g1 = ops.gram(grads, mask=mask, masked=[False, True], backend="reference")
    assert len(selects) == len(SHAPES)
    p_after, st_after = [p.clone() for p in params], {k: [x.clone() for x in v] for k, v in st.items()}
    _two_role_step(grads, mask, p_after, st_after)
    assert len(selects) == len(SHAPES)  # taken, not selected again
    assert all(torch.equal(a, b) for a, b in zip(p_after, p_alone))
    for k in st:
        assert all(torch.equal(a, b) for a, b in zip(st_after[k], st_alone[k])), k
    g2 = ops.gram(grads, mask=mask, masked=[False, True], backend="reference")
    assert torch.equal(g1, g2)

    ops.gram(grads, mask=mask, masked=[False, True], backend="reference")
    grads[1][4].mul_(3.0)  # in place, after the gram: the step must read the new values
    p_new, st_new = [p.clone() for p in params], {k: [x.clone() for x in v] for k, v in st.items()}
    _two_role_step(grads, mask, p_new, st_new)
    p_want, st_want = [p.clone() for p in params], {k: [x.clone() for x in v] for k, v in st.items()}
    _two_role_step([[g.clone() for g in r] for r in grads], mask, p_want, st_want)
    assert all(torch.equal(a, b) for a, b in zip(p_new, p_want))
    assert not torch.equal(p_new[4], p_alone[4])


def test_an_unclaimed_selection_is_released_with_its_gradients():
    grads = _grads(2, torch.float32)
    mask = [ops.pack_bits(torch.rand(s) < 0.5) for s in SHAPES]
    _util._SELECT_CACHE.clear()
    ops.gram(grads, mask=mask, masked=[False, True], backend="reference")
    assert len(_util._SELECT_CACHE) == 1
    grads[1] = None  # the masked role's gradients are freed (as zero_grad does): so is the selection
    assert len(_util._SELECT_CACHE) == 0
    for _ in range(5):  # bounded however many grams go unclaimed
        ops.gram(_grads(2, torch.float32), mask=mask, masked=[True, True], backend="reference")
    assert len(_util._SELECT_CACHE) <= _util.SELECT_CACHE_SIZE
