"""Benchmark case of ``merge_stats``: its data, the fastclu call and its peers."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _loop_and_compile, _make_merge, _with_shapes


def _merge_stats_loop(d: Data) -> Step:
    def step() -> tuple[Tensor, Tensor]:
        num = torch.zeros((), device=d["fs"][0].device)
        den = torch.zeros((), device=d["fs"][0].device)
        for p, a, fs, fts in zip(d["params"], d["anchor"], d["fs"], d["fts"]):
            delta = p.float() - a.float()
            num = num + (delta * (fts - a.float() * fs)).sum()
            den = den + (delta * delta * fs).sum()
        return num, den

    return step


CASES: list[Case] = [
    Case(
        "merge_stats", "merge_stats", _with_shapes(_make_merge),
        lambda d, b: lambda: ops.merge_stats(d["params"], d["anchor"], d["fs"], d["fts"], backend=b),
        _loop_and_compile(_merge_stats_loop), "P&M sums",
    ),
]  # fmt: skip
