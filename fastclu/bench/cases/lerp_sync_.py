"""Benchmark case of ``lerp_sync_``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _randn, _with_shapes


def _make_lerp(shapes, dtype, device) -> Data:
    return {"slow": _randn(shapes, torch.float32, device), "fast": _randn(shapes, dtype, device)}


def _lerp_loop(d: Data) -> Step:
    def step() -> None:
        for s, f in zip(d["slow"], d["fast"]):
            s.add_(f.float() - s, alpha=0.5)
            f.copy_(s)

    return step


def _lerp_foreach(d: Data) -> Step:
    def step() -> None:
        fast = d["fast"] if d["fast"][0].dtype == torch.float32 else [f.float() for f in d["fast"]]
        torch._foreach_lerp_(d["slow"], fast, 0.5)
        torch._foreach_copy_(d["fast"], d["slow"])

    return step


CASES: list[Case] = [
    Case(
        "lerp_sync_", "lerp_sync_", _with_shapes(_make_lerp),
        lambda d, b: lambda: ops.lerp_sync_(d["slow"], d["fast"], 0.5, backend=b),
        _loop_and_compile(_lerp_loop, _lerp_foreach), "Lookahead sync",
    ),
]  # fmt: skip
