"""SGD with momentum / dampening / Nesterov / weight decay (torch.optim.SGD's op order)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastclu.ops.reference import _util
from fastclu.ops.rules import StepConfig


def update(theta: Tensor, g: Tensor, bufs: dict[str, Tensor], step: Tensor | None, cfg: StepConfig) -> None:
    """In place on ``theta`` (and ``bufs["momentum_buffer"]``): torch.optim.sgd._single_tensor_sgd.

    A tensor lr that cannot be read on the host (meta, accelerator under tracing) is applied as
    ``theta += g * -lr``, as in :func:`update_foreach`.
    """
    if cfg.weight_decay != 0:
        g = g.add(theta, alpha=cfg.weight_decay)
    if cfg.momentum != 0:
        buf = bufs["momentum_buffer"]
        if cfg.init_momentum:
            buf.copy_(g)
        else:
            buf.mul_(cfg.momentum).add_(g, alpha=1 - cfg.dampening)
        g = g.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
    if _util.host_readable(cfg.lr):
        theta.add_(g, alpha=-cfg.lr)
    else:
        theta.add_(g * -cfg.lr)


def update_foreach(
    thetas: list[Tensor], gs: list[Tensor], bufs: dict[str, list[Tensor]], steps: list[Tensor] | None, cfg: StepConfig
) -> None:
    """:func:`update` over lists with ``torch._foreach_*``, in torch.optim.sgd._multi_tensor_sgd's
    op order. ``gs`` is read, never written.

    A float lr, or a CPU tensor lr (read on the host, as torch does): bit-identical to torch's
    multi-tensor and single-tensor SGD. A tensor lr on an accelerator / the meta device (or
    under tracing) stays a tensor (``theta += g * -lr``, as torch does under ``torch.compile``):
    within one rounding of that (``add(alpha=)`` fuses ``alpha * g + theta``).
    """
    if cfg.weight_decay != 0:
        gs = torch._foreach_add(gs, thetas, alpha=cfg.weight_decay)
    if cfg.momentum != 0:
        mbufs = bufs["momentum_buffer"]
        if cfg.init_momentum:
            torch._foreach_copy_(mbufs, gs)
        else:
            torch._foreach_mul_(mbufs, cfg.momentum)
            torch._foreach_add_(mbufs, gs, alpha=1 - cfg.dampening)
        gs = torch._foreach_add(gs, mbufs, alpha=cfg.momentum) if cfg.nesterov else mbufs
    if _util.host_readable(cfg.lr):
        torch._foreach_add_(thetas, gs, alpha=-cfg.lr)
    else:
        torch._foreach_add_(thetas, torch._foreach_mul(gs, -cfg.lr))
