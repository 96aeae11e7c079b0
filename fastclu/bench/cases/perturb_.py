"""Benchmark cases of ``perturb_``: its data, the fastclu call and its peers."""

from __future__ import annotations

import math

import torch

from fastclu import ops
from fastclu.bench.cases._common import Case, Data, Step, _compiled, _loop_and_compile, _make_perturb, _with_shapes


def _perturb_anchor_loop(d: Data) -> Step:
    def step() -> None:
        for p, a, b in zip(d["params"], d["anchor"], d["backup"]):
            b.copy_(p)
            p.add_(p - a, alpha=0.5)

    return step


def _perturb_anchor_foreach(d: Data) -> Step:
    def step() -> None:
        torch._foreach_copy_(d["backup"], d["params"])
        delta = torch._foreach_sub(d["params"], d["anchor"])
        torch._foreach_add_(d["params"], delta, alpha=0.5)

    return step


def _perturb_noise_loop(d: Data) -> Step:
    # Flat-LoRA-style noise as written with torch's RNG: same math, different generator.
    def step() -> None:
        for p, b in zip(d["params"], d["backup"]):
            b.copy_(p)
            rows = p.reshape(p.shape[0], -1) if p.dim() >= 2 else p.reshape(1, -1)
            norms = rows.float().norm(dim=1, keepdim=True) / math.sqrt(rows.shape[1])
            noise = torch.randn(rows.shape, device=p.device) * norms
            rows.add_((0.05 * noise).to(p.dtype))

    return step


CASES: list[Case] = [
    Case(
        "perturb_anchor", "perturb_", _with_shapes(_make_perturb),
        lambda d, b: lambda: ops.perturb_(d["params"], 0.5, backup=d["backup"], anchor=d["anchor"], backend=b),
        _loop_and_compile(_perturb_anchor_loop, _perturb_anchor_foreach), "P&M: theta += k eps (theta - anchor)",
    ),
    Case(
        "perturb_noise", "perturb_", _with_shapes(_make_perturb),
        lambda d, b: lambda: ops.perturb_(d["params"], 0.05, backup=d["backup"], seed=1234, backend=b),
        {"loop": _perturb_noise_loop, "compile": _compiled(_perturb_noise_loop)},
        "Flat-LoRA: row-scaled Gaussian noise",
    ),
]  # fmt: skip
