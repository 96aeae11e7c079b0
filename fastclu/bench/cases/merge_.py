"""Benchmark case of ``merge_``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _make_merge, _with_shapes


def _merge_loop(d: Data) -> Step:
    def step() -> None:
        for p, a in zip(d["params"], d["anchor"]):
            p.copy_(a.float() + 0.5 * (p.float() - a.float()))

    return step


def _merge_foreach(d: Data) -> Step:
    # theta = anchor + alpha (theta - anchor) = lerp(theta, anchor, 1 - alpha)
    return lambda: torch._foreach_lerp_(d["params"], d["anchor"], 0.5)


CASES: list[Case] = [
    Case(
        "merge_", "merge_", _with_shapes(_make_merge),
        lambda d, b: lambda: ops.merge_(d["params"], d["anchor"], 0.5, backend=b),
        _loop_and_compile(_merge_loop, _merge_foreach), "theta = anchor + alpha delta",
    ),
]  # fmt: skip
