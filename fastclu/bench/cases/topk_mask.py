"""Benchmark case of ``topk_mask``: its data, the fastclu call and its peers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _randn, _with_shapes


def _make_topk(shapes, dtype, device) -> Data:
    scores = _randn(shapes, dtype, device)
    total = sum(math.prod(s) for s in shapes)
    return {"scores": scores, "k": max(1, total // 10)}


def _topk_cat(d: Data) -> Step:
    # What SalUn's code does: concatenate every score, torch.topk, scatter back to masks.
    def step() -> list[Tensor]:
        flat = torch.cat([s.reshape(-1) for s in d["scores"]])
        idx = torch.topk(flat, d["k"], sorted=False).indices
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[idx] = True
        return list(torch.split(mask, [s.numel() for s in d["scores"]]))

    return step


def _topk_kthvalue(d: Data) -> Step:
    def step() -> list[Tensor]:
        flat = torch.cat([s.reshape(-1) for s in d["scores"]])
        thr = torch.kthvalue(flat.float(), flat.numel() - d["k"] + 1).values
        return [s >= thr for s in d["scores"]]

    return step


CASES: list[Case] = [
    Case(
        "topk_mask", "topk_mask", _with_shapes(_make_topk),
        lambda d, b: lambda: ops.topk_mask(d["scores"], d["k"], backend=b),
        {"cat_topk": _topk_cat, "cat_kthvalue": _topk_kthvalue}, "exact global top-10%",
    ),
]  # fmt: skip
