"""CUDA backend: ``perturb_`` (task vector, direction, or row-scaled Philox noise) and ``restore_``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu import _C
from fastclu._registry import register
from fastclu.ops.cuda import _launch
from fastclu.ops.cuda._launch import build_table, on_device, require_cuda, scalar, stream_of
from fastclu.ops.tables import TABLES

Scalar = float | Tensor


def _rows(t: Tensor) -> int:
    return t.shape[0] if t.dim() >= 2 else 1


@register("perturb_", "cuda")
def perturb_(
    params: list[Tensor],
    scale: Scalar,
    *,
    backup: list[Tensor] | None,
    anchor: list[Tensor] | None,
    direction: list[Tensor] | None,
    seed: int | None,
    row_norms: list[Tensor] | None,
) -> list[Tensor] | None:
    """``backup = theta; theta += scale * d`` in one launch (plus one for the row norms).

    Seed mode returns fp32 row norms (``[rows]`` per param), computed from the clean weights
    by a deterministic fp64 block reduction, or the given ``row_norms`` as fp32.
    """
    op = "perturb_"
    for name, xs in (("params", params), ("backup", backup), ("anchor", anchor), ("direction", direction)):
        if xs is not None:
            require_cuda(op, name, xs)
    if not params:
        return [] if seed is not None else None
    dev = params[0].device
    with on_device(dev):
        s = scalar(scale, dev)
        stream = stream_of(dev)
        if seed is None:
            src = anchor if anchor is not None else direction
            t = build_table(op, [params, backup, src], dev, dynamic=TABLES["perturb"].dynamic)
            _C.perturb_dir(*t.args, s.value, s.ptr, 0 if anchor is not None else 1, stream)
            return None
        rows = [_rows(p) for p in params]
        lengths = [p.numel() // r if r else 0 for p, r in zip(params, rows)]
        if row_norms is None:
            # one allocation for every tensor's norms (views of it), not one per tensor; empty
            # tensors get no table row, so their (zero) norms are written here
            norms = list(_launch.alloc(sum(rows), torch.float32, dev).split(rows))
            if 0 in map(Tensor.numel, params):
                for n, p in zip(norms, params):
                    if p.numel() == 0:
                        n.zero_()
            rt = build_table(op, [params, norms], dev, units=rows, aux=lengths, dynamic=TABLES["row_norms"].dynamic)
            _C.row_norms(*rt.args, stream)
        else:
            norms = [r.reshape(-1).to(device=dev, dtype=torch.float32).contiguous() for r in row_norms]
        t = build_table(op, [params, backup, norms], dev, aux=lengths, dynamic=TABLES["perturb"].dynamic)
        _C.perturb_noise(*t.args, s.value, s.ptr, int(seed), stream)
        return norms


@register("restore_", "cuda")
def restore_(params: list[Tensor], backup: list[Tensor]) -> None:
    """Bit-exact ``params[i] = backup[i]``: one raw-copy launch over every tensor."""
    op = "restore_"
    if not params:
        return
    require_cuda(op, "params", params)
    require_cuda(op, "backup", backup)
    dev = params[0].device
    with on_device(dev):
        t = build_table(op, [params, backup], dev, dynamic=TABLES["restore"].dynamic)
        _C.restore_mt(*t.args, stream_of(dev))
