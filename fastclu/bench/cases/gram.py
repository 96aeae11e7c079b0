"""Benchmark case of ``gram``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _masks, _randn, _with_shapes


def _make_gram(shapes, dtype, device) -> Data:
    packed, bools = _masks(shapes, device)
    return {"g0": _randn(shapes, dtype, device), "g1": _randn(shapes, dtype, device), "mask": packed, "bool": bools}


def _gram_loop(d: Data) -> Step:
    def step() -> Tensor:
        roles = [d["g0"], d["g1"]]
        out = torch.zeros(2, 2, device=d["g0"][0].device)
        for r in range(2):
            for s in range(r, 2):
                acc = torch.zeros((), device=out.device)
                for gr, gs, m in zip(roles[r], roles[s], d["bool"]):
                    acc = acc + ((gr.float() * m) * (gs.float() * m)).sum()
                out[r, s] = acc
                out[s, r] = acc
        return out

    return step


CASES: list[Case] = [
    Case(
        "gram", "gram", _with_shapes(_make_gram),
        lambda d, b: lambda: ops.gram([d["g0"], d["g1"]], mask=d["mask"], backend=b),
        _loop_and_compile(_gram_loop), "2x2 Gram of masked role grads",
    ),
]  # fmt: skip
