"""Inputs and comparisons shared by the reference combine_step_ tests (one home, not a copy per file)."""

from __future__ import annotations

import torch

# every tensor kind a list holds: 2-d, 1-d, 0-d, empty, 3-d, odd lengths
SHAPES = [(7, 5), (13,), (), (0,), (3, 1, 4), (33,), (2, 65)]


def rand(dtype: torch.dtype = torch.float32, fn=torch.randn, shapes=SHAPES) -> list[torch.Tensor]:
    return [fn(s, dtype=dtype) for s in shapes]


def clone(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.clone() for x in xs]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def zero_adamw_state(params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """A fresh AdamW state (moments, AMSGrad max, 0-d step counters) for ``params``, as torch starts it."""
    return {
        "exp_avg": [torch.zeros_like(p) for p in params],
        "exp_avg_sq": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sq": [torch.zeros_like(p) for p in params],
        "step": [torch.tensor(0.0) for _ in params],
    }
