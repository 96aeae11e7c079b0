"""Benchmark case of ``soup_coef_grads``: per-layer <grad, theta_k - c> for K = 3, its peers."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _randn, _with_shapes
from fastclu.bench.cases.soup_combine_ import SOUP_K


def _make_grads(shapes, dtype, device) -> Data:
    return {"grads": _randn(shapes, dtype, device), "diffs": [_randn(shapes, dtype, device) for _ in range(SOUP_K)]}


def _grads_loop(d: Data) -> Step:
    def step() -> Tensor:
        rows = [[(g.float() * dk.float()).sum() for g, dk in zip(d["grads"], dks)] for dks in d["diffs"]]
        return torch.stack([torch.stack(r) for r in rows])

    return step


def _grads_foreach(d: Data) -> Step:
    def step() -> Tensor:
        rows = [torch.stack([t.sum(dtype=torch.float32) for t in torch._foreach_mul(d["grads"], dks)])
                for dks in d["diffs"]]  # fmt: skip
        return torch.stack(rows)

    return step


CASES: list[Case] = [
    Case(
        "soup_coef_grads", "soup_coef_grads", _with_shapes(_make_grads),
        lambda d, b: lambda: ops.soup_coef_grads(d["grads"], d["diffs"], backend=b),
        _loop_and_compile(_grads_loop, _grads_foreach), "[K, L] <grad_l, theta_k,l - c_l>, K = 3",
    ),
]  # fmt: skip
