"""ratio_mask and topk_mask kernels: bit-packed masks equal to the reference's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import (
    BACKENDS,
    BIG,
    DEVICE,
    FLOATS,
    SIZES,
    assert_equal,
    many_sizes,
    need,
    poison_alloc,  # noqa: F401
    rand,
    shapes,
)

from fastclu.ops import count_bits, ratio_mask, topk_mask, unpack_bits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_ratio_mask_matches_reference(backend: str, dtype: torch.dtype, poison_alloc) -> None:  # noqa: F811
    need(backend)
    ff, fr = rand(SIZES, dtype), rand(SIZES, dtype)
    ff[2][:10] = fr[2][:10]  # exact equality sits on the >= boundary
    got = ratio_mask(ff, fr, 1.0, backend=backend)
    assert_equal(got, ratio_mask(ff, fr, 1.0, backend="reference"))
    # independent formulation, padding bits included (they must be 0)
    for m, a, b in zip(got, ff, fr):
        keep = (a.float() + 1e-12) >= (b.float() + 1e-12)
        padded = torch.cat([keep.reshape(-1), keep.new_zeros(m.numel() * 8 - a.numel())])
        assert torch.equal(unpack_bits(m, m.numel() * 8), padded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_mask_tensor_gamma_many(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    sizes = many_sizes()
    ff, fr = rand(sizes), rand(sizes)
    gamma = torch.tensor(0.8, device=DEVICE)
    assert_equal(ratio_mask(ff, fr, gamma, backend=backend), ratio_mask(ff, fr, gamma, backend="reference"))


def _scores(sizes: list[int], dtype: torch.dtype, ties: bool) -> list[torch.Tensor]:
    if not ties:
        return [torch.randn(s, device=DEVICE).to(dtype) for s in shapes(sizes)]
    # few distinct values, both zeros: ties decide most of the mask
    out = []
    for s in shapes(sizes):
        x = torch.randint(-3, 4, s, device=DEVICE).to(dtype) * 0.5
        x[torch.rand(s, device=DEVICE) < 0.2] = -0.0
        out.append(x)
    return out


def _topk_check(backend: str, scores: list[torch.Tensor], k: int) -> None:
    got = topk_mask(scores, k, backend=backend)
    assert_equal(got, topk_mask(scores, k, backend="reference"))
    assert sum(count_bits(m) for m in got) == k
    # independent check: every kept score >= every dropped one
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    bits = torch.cat([unpack_bits(m, s.numel()) for m, s in zip(got, scores)])
    if 0 < k < flat.numel():
        assert flat[bits].min() >= flat[~bits].max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_mask_matches_reference(backend: str, dtype: torch.dtype, ties: bool, poison_alloc) -> None:  # noqa: F811
    need(backend)
    scores = _scores([*SIZES, 300], dtype, ties)
    total = sum(s.numel() for s in scores)
    for k in (0, 1, int(torch.randint(2, total, ())), total):
        _topk_check(backend, scores, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_mask_fp64_keys_run_on_the_reference(backend: str, ties: bool, poison_alloc, kernel_calls) -> None:  # noqa: F811
    """fp64 scores (mixed with fp32 ones) need 64-bit keys: values differing past fp32 precision.

    The kernels have 32-bit keys only: a call with fp64 scores is routed to the reference
    whatever backend is asked for, and this checks both the routing and the fp64 order.
    """
    need(backend)
    kernel_calls.expect_reference()
    scores = _scores([4097, 7], torch.float64, ties) + _scores([33], torch.float32, ties)
    base = scores[0][:200].clone()
    scores[0][200:400] = base + 1e-12 * torch.rand(200, device=DEVICE, dtype=torch.float64)  # equal in fp32
    total = sum(s.numel() for s in scores)
    for k in (1, int(torch.randint(2, total, ())), total - 1):
        _topk_check(backend, scores, k)
    # values equal in fp32 but ordered in fp64: the kept half is decided by fp64 order alone
    x = 1.0 + 1e-12 * torch.randperm(100, device=DEVICE).double()
    bits = unpack_bits(topk_mask([x], 50, backend=backend)[0], 100)
    assert torch.equal(bits, x >= x.median() + 0.5e-12)
    assert kernel_calls.total == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_mask_many_tensors(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    scores = _scores(many_sizes(), torch.float32, ties=True)
    total = sum(s.numel() for s in scores)
    _topk_check(backend, scores, int(torch.randint(1, total, ())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_mask_big(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    scores = _scores([BIG], torch.float32, ties=False)  # one tensor
    _topk_check(backend, scores, 777)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_mask_extremes(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    x = torch.tensor([float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, -0.0, 1.0], device=DEVICE)
    for k in range(x.numel() + 1):
        _topk_check(backend, [x, x.flip(0)], k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_mask_fp64_compares_in_fp64(backend: str, poison_alloc, kernel_calls) -> None:  # noqa: F811
    """fp64 Fishers are compared in fp64, as the reference does: values that differ only past fp32
    precision, and a host gamma / eps that fp32 would round, still decide the mask. The call is
    routed to the reference (the kernels compare in fp32), which this checks too."""
    need(backend)
    kernel_calls.expect_reference()
    n = 4097
    fr = 1.0 + torch.rand(n, device=DEVICE, dtype=torch.float64)
    ff = fr + 1e-13 * torch.randn(n, device=DEVICE, dtype=torch.float64)  # equal once rounded to fp32
    gamma = 1.0 + 1e-14  # rounds to 1.0 in fp32
    got = ratio_mask([ff, ff[:7].float()], [fr, fr[:7]], gamma, eps=1e-12, backend=backend)
    want = ratio_mask([ff, ff[:7].float()], [fr, fr[:7]], gamma, eps=1e-12, backend="reference")
    assert_equal(got, want)
    # independent fp64 formulation; both outcomes occur, so an fp32 comparison could not pass
    keep = (ff + 1e-12) >= gamma * (fr + 1e-12)
    assert 0 < int(keep.sum()) < n
    assert torch.equal(unpack_bits(got[0], n), keep)
    assert kernel_calls.total == 0
