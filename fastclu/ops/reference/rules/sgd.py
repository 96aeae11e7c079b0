"""SGD with momentum / dampening / Nesterov / weight decay (torch.optim.SGD's op order)."""

from __future__ import annotations

from torch import Tensor

from fastclu.ops.rules import StepConfig


def update(theta: Tensor, g: Tensor, bufs: dict[str, Tensor], step: Tensor | None, cfg: StepConfig) -> None:
    """In place on ``theta`` (and ``bufs["momentum_buffer"]``): torch.optim.sgd._single_tensor_sgd."""
    if cfg.weight_decay != 0:
        g = g.add(theta, alpha=cfg.weight_decay)
    if cfg.momentum != 0:
        buf = bufs["momentum_buffer"]
        if cfg.init_momentum:
            buf.copy_(g)
        else:
            buf.mul_(cfg.momentum).add_(g, alpha=1 - cfg.dampening)
        g = g.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
    theta.add_(g, alpha=-cfg.lr)
