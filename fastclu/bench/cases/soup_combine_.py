"""Benchmark case of ``soup_combine_``: a MEHL-Soup+ point of K = 3 ingredients, its peers."""

from __future__ import annotations

import torch

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _randn, _with_shapes

SOUP_K = 3


def _make_soup(shapes, dtype, device) -> Data:
    return {
        "out": _randn(shapes, dtype, device), "base": _randn(shapes, dtype, device),
        "diffs": [_randn(shapes, dtype, device, 0.1) for _ in range(SOUP_K)],
        "coefs": torch.rand(SOUP_K, len(shapes), device=device),
    }  # fmt: skip


def _soup_loop(d: Data) -> Step:
    cs = d["coefs"].tolist()

    def step() -> None:
        for i, (o, b) in enumerate(zip(d["out"], d["base"])):
            acc = b.float()
            for k, dk in enumerate(d["diffs"]):
                acc = acc + cs[k][i] * dk[i].float()
            o.copy_(acc)

    return step


def _soup_foreach(d: Data) -> Step:
    cs = d["coefs"].tolist()

    def step() -> None:
        torch._foreach_copy_(d["out"], d["base"])
        for k, dk in enumerate(d["diffs"]):
            torch._foreach_add_(d["out"], torch._foreach_mul(dk, cs[k]))

    return step


CASES: list[Case] = [
    Case(
        "soup_combine_", "soup_combine_", _with_shapes(_make_soup),
        lambda d, b: lambda: ops.soup_combine_(d["out"], d["base"], d["diffs"], d["coefs"], backend=b),
        _loop_and_compile(_soup_loop, _soup_foreach), "theta = c + sum_k x[k, l] (theta_k - c), K = 3",
    ),
]  # fmt: skip
