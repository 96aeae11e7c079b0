"""Benchmark case of ``ratio_mask``: its data, the fastclu call and its peers."""

from __future__ import annotations

from torch import Tensor

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _rand_pos, _with_shapes


def _make_ratio(shapes, dtype, device) -> Data:
    return {"ff": _rand_pos(shapes, dtype, device), "fr": _rand_pos(shapes, dtype, device)}


def _ratio_loop(d: Data) -> Step:
    # The papers keep a boolean (often float) mask per parameter; packing is fastclu's layout.
    def step() -> list[Tensor]:
        return [(f.float() + 1e-12) >= 1.0 * (r.float() + 1e-12) for f, r in zip(d["ff"], d["fr"])]

    return step


CASES: list[Case] = [
    Case(
        "ratio_mask", "ratio_mask", _with_shapes(_make_ratio),
        lambda d, b: lambda: ops.ratio_mask(d["ff"], d["fr"], 1.0, backend=b),
        _loop_and_compile(_ratio_loop), "m = F_f + eps >= gamma (F_r + eps), packed",
    ),
]  # fmt: skip
