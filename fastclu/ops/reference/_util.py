"""Helpers shared by the reference ops: the compute dtype and scalar handling."""

from __future__ import annotations

import torch
from torch import Tensor

Scalar = float | Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any operand is fp64, else fp32: fp16/bf16 math is always done in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_compute(x: Scalar, dtype: torch.dtype) -> Scalar:
    """A scalar in the compute dtype; 0-d tensors stay tensors (no host sync) and keep their device.

    A 0-d CPU tensor combines with tensors on any device, so it is not moved.
    """
    if isinstance(x, Tensor):
        return x.to(dtype)
    return float(x)


def up(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in the compute dtype (no copy when it already is)."""
    return t.to(dtype)


def all_fp32(*lists: list[Tensor]) -> bool:
    """True when every tensor is fp32: then the ``torch._foreach_*`` path computes exactly what the
    per-tensor loop does (no casts in or out), with far fewer launches on a GPU."""
    return bool(lists[0]) and all(t.dtype == torch.float32 for xs in lists for t in xs)
