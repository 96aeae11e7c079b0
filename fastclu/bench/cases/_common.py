"""What every benchmark case shares: the :class:`Case` record, data builders, hyperparameters,
the ``torch.optim`` and ``torch.compile`` peers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastclu.bench.timer import Step
from fastclu.ops.bits import pack_bits

# A case's tensors and settings by name; every builder adds shapes, dtype and device.
Data = dict[str, Any]


def _randn(
    shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device, scale: float = 1.0
) -> list[Tensor]:
    return [torch.randn(tuple(s), dtype=torch.float32, device=device).mul_(scale).to(dtype) for s in shapes]


def _rand_pos(shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    # Strictly positive, like Fishers / second moments.
    return [torch.rand(tuple(s), dtype=torch.float32, device=device).add_(1e-3).to(dtype) for s in shapes]


def _masks(shapes: Sequence[Sequence[int]], device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """(bit-packed masks, the same masks as bool tensors shaped like the params)."""
    bools = [torch.rand(tuple(s), device=device) < 0.5 for s in shapes]
    return [pack_bits(b) for b in bools], bools


def _leaf_params(shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    ps = _randn(shapes, dtype, device)
    gs = _randn(shapes, dtype, device, 1e-2)
    for p, g in zip(ps, gs):
        p.requires_grad_(True)
        p.grad = g
    return ps


LR, MOMENTUM, WD = 1e-2, 0.9, 5e-4
ADAM_LR, ADAM_WD, BETAS, ADAM_EPS = 1e-3, 1e-2, (0.9, 0.999), 1e-8


@dataclass
class Case:
    """One benchmarked computation: how to build its data, call fastclu, and call each peer."""

    name: str
    op: str
    make: Callable[[list[tuple[int, ...]], torch.dtype, torch.device], Data]
    fastclu: Callable[[Data, str], Step]
    peers: dict[str, Callable[[Data], Step]] = field(default_factory=dict)
    doc: str = ""


def _sgd_peer(kind: str) -> Callable[[Data], Step]:
    def build(d: Data) -> Step:
        params = _leaf_params(d["shapes"], d["dtype"], d["device"])
        extra = {"foreach": False} if kind == "loop" else {"foreach": True} if kind == "foreach" else {"fused": True}
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, **extra)
        return opt.step

    return build


def _adamw_peer(kind: str) -> Callable[[Data], Step]:
    def build(d: Data) -> Step:
        params = _leaf_params(d["shapes"], d["dtype"], d["device"])
        extra = {"foreach": False} if kind == "loop" else {"foreach": True} if kind == "foreach" else {"fused": True}
        opt = torch.optim.AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, **extra)
        return opt.step

    return build


def _compiled(step_builder: Callable[[Data], Step]) -> Callable[[Data], Step]:
    """``torch.compile`` of a peer's step (compilation happens during the warm-up, not timed)."""

    def build(d: Data) -> Step:
        torch._dynamo.reset()  # a fresh cache per case: shapes differ, and the cache limit is small
        return torch.compile(step_builder(d))

    return build


def _make_perturb(shapes, dtype, device) -> Data:
    params = _randn(shapes, dtype, device)
    return {
        "params": params,
        "anchor": [(p.float() + 0.1 * torch.randn_like(p, dtype=torch.float32)).to(dtype) for p in params],
        # Poisoned, not empty_like: a backup the step failed to write shows up as NaN.
        "backup": [torch.full_like(p, float("nan")) for p in params],
    }


def _make_merge(shapes, dtype, device) -> Data:
    d = _make_perturb(shapes, dtype, device)
    d["fs"] = _rand_pos(shapes, torch.float32, device)
    d["fts"] = _randn(shapes, torch.float32, device)
    return d


def _with_shapes(make: Callable[..., Data]) -> Callable[..., Data]:
    def wrapped(shapes, dtype, device) -> Data:
        d = make(shapes, dtype, device)
        d.update(shapes=shapes, dtype=dtype, device=device)
        return d

    return wrapped


def _loop_and_compile(loop: Callable[[Data], Step], foreach: Callable[[Data], Step] | None = None):
    peers = {"loop": loop}
    if foreach is not None:
        peers["foreach"] = foreach
    peers["compile"] = _compiled(loop)
    return peers
