"""Benchmark case of ``fisher_accumulate_``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _rand_pos, _randn, _with_shapes


def _make_fisher(shapes, dtype, device) -> Data:
    return {"fisher": _rand_pos(shapes, torch.float32, device), "grads": _randn(shapes, dtype, device)}


def _fisher_loop(d: Data) -> Step:
    def step() -> None:
        for f, g in zip(d["fisher"], d["grads"]):
            f.add_(g.float() ** 2)

    return step


def _fisher_foreach(d: Data) -> Step:
    def step() -> None:
        g = d["grads"] if d["grads"][0].dtype == torch.float32 else [x.float() for x in d["grads"]]
        torch._foreach_addcmul_(d["fisher"], g, g)

    return step


CASES: list[Case] = [
    Case(
        "fisher_accumulate_", "fisher_accumulate_", _with_shapes(_make_fisher),
        lambda d, b: lambda: ops.fisher_accumulate_(d["fisher"], d["grads"], backend=b),
        _loop_and_compile(_fisher_loop, _fisher_foreach), "F += g^2",
    ),
]  # fmt: skip
