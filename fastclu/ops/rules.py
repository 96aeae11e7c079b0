"""Update rules of :func:`fastclu.ops.combine_step_` and the frozen step configuration.

A rule is registered here once (:data:`RULES`: its state keys) and implemented once per
backend, in a file named after it: ``fastclu/ops/reference/rules/<rule>.py`` (a function
``update(theta, g, bufs, step, cfg)``) and ``fastclu/ops/triton/rules/<rule>.py`` (a Triton
function picked by a constexpr). The shared prologue (mask, role weights, scale, AMP unscale,
penalty, fused restore) is written once per backend, in that backend's ``combine.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class StepConfig:
    """Everything about one step's update rule: validated once, by :meth:`validate`."""

    rule: str
    lr: float | Tensor
    weight_decay: float = 0.0
    maximize: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    init_momentum: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False

    @property
    def state_keys(self) -> list[str]:
        """The state lists this rule reads and writes (``"step"``: 0-d counters)."""
        return RULES[self.rule].state_keys(self)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the hyperparameter at fault."""
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        for name in ("weight_decay", "momentum", "dampening", "eps"):
            v = getattr(self, name)
            if not v >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        RULES[self.rule].check(self)


@dataclass(frozen=True)
class Rule:
    """A registered update rule: its state keys and its own hyperparameter checks."""

    name: str
    state_keys: Callable[[StepConfig], list[str]]
    check: Callable[[StepConfig], None]


def _check_sgd(cfg: StepConfig) -> None:
    if cfg.nesterov and (cfg.momentum <= 0 or cfg.dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")


def _check_adamw(cfg: StepConfig) -> None:
    if not (0.0 <= cfg.betas[0] < 1.0 and 0.0 <= cfg.betas[1] < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {cfg.betas}")


RULES: dict[str, Rule] = {
    "sgd": Rule("sgd", lambda c: ["momentum_buffer"] if c.momentum != 0 else [], _check_sgd),
    "adamw": Rule(
        "adamw", lambda c: ["exp_avg", "exp_avg_sq", "step"] + (["max_exp_avg_sq"] if c.amsgrad else []), _check_adamw
    ),
}
