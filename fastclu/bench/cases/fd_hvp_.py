"""Benchmark case of ``fd_hvp_``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _randn, _with_shapes


def _make_hvp(shapes, dtype, device) -> Data:
    return {
        "out": _randn(shapes, dtype, device),
        "gp": _randn(shapes, dtype, device),
        "gm": _randn(shapes, dtype, device),
    }


def _hvp_loop(d: Data) -> Step:
    def step() -> None:
        for o, gp, gm in zip(d["out"], d["gp"], d["gm"]):
            o.copy_((gp.float() - gm.float()) / (2 * 1e-3))

    return step


def _hvp_foreach(d: Data) -> Step:
    def step() -> None:
        diff = torch._foreach_sub(d["gp"], d["gm"])
        torch._foreach_mul_(diff, 1.0 / (2 * 1e-3))
        torch._foreach_copy_(d["out"], diff)

    return step


CASES: list[Case] = [
    Case(
        "fd_hvp_", "fd_hvp_", _with_shapes(_make_hvp),
        lambda d, b: lambda: ops.fd_hvp_(d["out"], d["gp"], d["gm"], 1e-3, backend=b),
        _loop_and_compile(_hvp_loop, _hvp_foreach), "(g+ - g-) / 2 eps",
    ),
]  # fmt: skip
