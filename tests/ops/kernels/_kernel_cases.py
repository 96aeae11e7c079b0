"""Shared pieces of the kernel suite: backends under test, devices, data, poisoning, tolerances.

Every kernel test runs an op on a kernel backend and on ``backend="reference"`` with identical
fresh random inputs (the suite seeds torch randomly per test) and compares.
Triton cases run on the GPU when there is one, else on the CPU under ``TRITON_INTERPRET=1``
(marker ``interpreter``); CUDA-extension cases run on the GPU (marker ``gpu``), else the same
kernels compiled for the CPU run on CPU tensors (marker ``cuda_cpu``, see csrc/cpu/).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

HAS_GPU = torch.cuda.is_available()
# Without a GPU the cuda cases run the csrc kernels on the CPU (fastclu._C_cpu, built on demand
# by this directory's conftest; FASTCLU_CUDA_ON_CPU=0 turns that off).
CUDA_ON_CPU = not HAS_GPU and os.environ.get("FASTCLU_CUDA_ON_CPU", "1").strip() != "0"

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.gpu if HAS_GPU else pytest.mark.interpreter, id="triton"),
    pytest.param("cuda", marks=pytest.mark.cuda_cpu if CUDA_ON_CPU else pytest.mark.gpu, id="cuda"),
]
# marker for Triton-only tests (internals of that backend)
TRITON = pytest.mark.gpu if HAS_GPU else pytest.mark.interpreter
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
FLOATS = [torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) for values of order 1 computed in fp32 and rounded once into the dtype. The
# interpreter rounds casts by truncation, hence a full ulp of the output dtype for fp16/bf16.
TOL = {
    torch.float32: (2e-6, 2e-6),
    torch.float64: (2e-6, 2e-6),  # kernels may compute fp64 in fp32
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# sizes: odd, a block boundary (+1), a lone element, an empty tensor; the large one is costly
# under the interpreter and is used by a few cases only
SIZES = [1, 7, 4097, 0]
BIG = 100003


def need(backend: str) -> None:
    """Skip when the backend cannot run here at all (CUDA extension not built), saying why."""
    import fastclu

    reason = fastclu.backends()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def many_sizes(n: int = 200, hi: int = 40) -> list[int]:
    """``n`` small tensor sizes, empty ones included, for the many-tensors cases."""
    return torch.randint(0, hi, (n,)).tolist()


def shapes(sizes: list[int]) -> list[tuple[int, ...]]:
    """Mostly flat shapes, with a 2-D one where the size factors (rows matter to perturb_)."""
    out = []
    for n in sizes:
        out.append((n // 7, 7) if n and n % 7 == 0 else (n,))
    return out


def randn(sizes: list[int], dtype: torch.dtype = torch.float32, scale: float = 1.0) -> list[Tensor]:
    return [(torch.randn(s, device=DEVICE) * scale).to(dtype) for s in shapes(sizes)]


def rand(sizes: list[int], dtype: torch.dtype = torch.float32, lo: float = 0.1, hi: float = 2.0) -> list[Tensor]:
    return [(lo + (hi - lo) * torch.rand(s, device=DEVICE)).to(dtype) for s in shapes(sizes)]


def clone(xs: list[Tensor]) -> list[Tensor]:
    return [x.clone() for x in xs]


def poisoned_like(xs: list[Tensor]) -> list[Tensor]:
    return [torch.full_like(x, float("nan")) for x in xs]


def random_masks(sizes: list[int], p: float = 0.5) -> list[Tensor]:
    from fastclu.ops import pack_bits

    return [pack_bits(torch.rand(n, device=DEVICE) < p) for n in sizes]


@pytest.fixture
def poison_alloc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every kernel-side allocation start as NaN (floats) or 0xA5 (integers)."""
    from fastclu.ops.triton import _multitensor as mt

    def alloc(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 0xA5
        return torch.full(shape if isinstance(shape, tuple) else (shape,), fill, dtype=dtype, device=device)

    monkeypatch.setattr(mt, "alloc", alloc)
    try:
        from fastclu.ops.cuda import _launch
    except ImportError:  # extension not built: the cuda cases skip anyway
        return
    monkeypatch.setattr(_launch, "alloc", alloc)


def assert_close(
    actual: list[Tensor] | Tensor, expected: list[Tensor] | Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    """Element-wise comparison at the dtype's stated tolerance (``scale`` widens it)."""
    if isinstance(actual, Tensor):
        actual, expected = [actual], [expected]
    assert len(actual) == len(expected)
    rtol, atol = TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"tensor {i}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
        torch.testing.assert_close(
            a.double(), e.double(), rtol=rtol * scale, atol=atol * scale, msg=lambda m, i=i: f"tensor {i}: {m}"
        )


def assert_equal(actual: list[Tensor], expected: list[Tensor]) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"tensor {i}"
        assert torch.equal(a, e), f"tensor {i} differs in {int((a != e).sum())} elements"
