"""Benchmark case of ``restore_``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _randn, _with_shapes


def _make_restore(shapes, dtype, device) -> Data:
    return {"params": _randn(shapes, dtype, device), "backup": _randn(shapes, dtype, device)}


def _restore_loop(d: Data) -> Step:
    def step() -> None:
        for p, b in zip(d["params"], d["backup"]):
            p.copy_(b)

    return step


def _restore_foreach(d: Data) -> Step:
    return lambda: torch._foreach_copy_(d["params"], d["backup"])


CASES: list[Case] = [
    Case(
        "restore_", "restore_", _with_shapes(_make_restore),
        lambda d, b: lambda: ops.restore_(d["params"], d["backup"], backend=b),
        {"loop": _restore_loop, "foreach": _restore_foreach}, "theta <- backup",
    ),
]  # fmt: skip
