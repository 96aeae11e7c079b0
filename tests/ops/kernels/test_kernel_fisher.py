"""fisher_accumulate_ kernels against the reference."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import BACKENDS, BIG, DEVICE, FLOATS, SIZES, assert_close, clone, many_sizes, need, rand, randn

from fastclu.ops import fisher_accumulate_


def _check(backend: str, sizes: list[int], dtype: torch.dtype, scale, power: int) -> None:
    fisher = rand(sizes)
    grads = randn(sizes, dtype)
    got, want = clone(fisher), clone(fisher)
    fisher_accumulate_(got, grads, scale, power=power, backend=backend)
    fisher_accumulate_(want, grads, scale, power=power, backend="reference")
    assert_close(got, want, torch.float32)
    assert any(not torch.equal(g, f) for g, f in zip(got, fisher) if g.numel()), "nothing was accumulated"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("power", [1, 2])
def test_fisher_matches_reference(backend: str, dtype: torch.dtype, power: int) -> None:
    need(backend)
    _check(backend, SIZES, dtype, 0.37, power)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_tensor_scale_many_tensors(backend: str) -> None:
    need(backend)
    _check(backend, many_sizes(), torch.float32, torch.tensor(1.7, device=DEVICE), 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_one_big_tensor(backend: str) -> None:
    need(backend)
    _check(backend, [BIG], torch.float16, 0.5, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_empty_list(backend: str) -> None:
    need(backend)
    fisher_accumulate_([], [], 1.0, backend=backend)
