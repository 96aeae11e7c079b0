"""Update rules of :func:`fastclu.ops.combine_step_` and the frozen step configuration.

A rule is registered here once (:data:`RULES`): its id (the CUDA dispatch index,
``fastclu._C.COMBINE_RULES``), the hyperparameters it reads (fields of :class:`StepConfig`),
its state keys, and how its hyperparameters reach the kernels: up to :data:`N_SLOTS` float
slots (doubles on the host; the Triton kernel gets each as an fp32 (hi, lo) pair, the CUDA
kernel as a double) and up to :data:`N_FLAGS` integer switches (Triton constexprs). It is then
implemented once per backend, in a file named after it:

* ``fastclu/ops/reference/rules/<rule>.py``: ``update(theta, g, bufs, step, cfg)`` and
  ``update_foreach(thetas, gs, bufs, steps, cfg)`` (PyTorch; the specification), optionally
  ``update_fused`` + ``fused_eligible`` (a torch fused kernel that computes the rule, e.g. AdamW's);
* ``fastclu/ops/triton/rules/<rule>.py``: a Triton function ``update`` (the kernel's constexpr
  ``RULE``), optionally a host hook ``prepare`` (per-tensor coefficients, e.g. AdamW's bias
  corrections);
* ``csrc/rules/<rule>.cuh``: a ``Rule`` struct, plus one line in ``csrc/combine.cu``'s rule table.

The shared prologue (mask, role weights, scale, AMP unscale, penalty, maximize, fused restore,
update mode, step counters) is written once per backend, in that backend's ``combine.py``.
A rule's state lists fill the table rows STATE0, STATE1, STATE_MAX in the order of
``state_keys`` (``"step"``, the per-tensor 0-d counters, has its own row and is left out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

N_SLOTS = 6  # float hyperparameter slots of a rule (csrc/combine.cuh kRuleSlots)
N_FLAGS = 4  # integer switches of a rule (csrc/combine.cuh kRuleFlags)
N_STATE_ROWS = 3  # state lists besides "step" (rows STATE0, STATE1, STATE_MAX)


@dataclass(frozen=True)
class StepConfig:
    """Everything about one step's update rule: validated once, by :meth:`validate`.

    The fields after ``maximize`` are the rules' hyperparameters (:data:`HPARAMS`); a rule reads
    the ones it lists in :attr:`Rule.hparams`.
    """

    rule: str
    lr: float | Tensor
    maximize: bool = False
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    init_momentum: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    threshold: float = 0.5
    power: float = 1.0
    apply_scaling: bool = True

    @property
    def state_keys(self) -> list[str]:
        """The state lists this rule reads and writes (``"step"``: 0-d counters)."""
        return RULES[self.rule].state_keys(self)

    @property
    def state_rows(self) -> list[str | None]:
        """The state key of each table row STATE0, STATE1, STATE_MAX (None: unused by this step)."""
        active = set(self.state_keys)
        rows = [k if k in active else None for k in RULES[self.rule].buffers]
        return rows + [None] * (N_STATE_ROWS - len(rows))

    @property
    def counts_steps(self) -> bool:
        """Whether the rule keeps per-tensor 0-d ``"step"`` counters (incremented by the op)."""
        return "step" in self.state_keys

    @property
    def slots(self) -> tuple[float, ...]:
        """The rule's float kernel slots, padded with 0 to :data:`N_SLOTS`."""
        s = tuple(float(x) for x in RULES[self.rule].slots(self))
        return s + (0.0,) * (N_SLOTS - len(s))

    @property
    def flags(self) -> tuple[int, ...]:
        """The rule's kernel switches, padded with 0 to :data:`N_FLAGS`."""
        f = tuple(int(x) for x in RULES[self.rule].flags(self))
        return f + (0,) * (N_FLAGS - len(f))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the hyperparameter at fault."""
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        for name in ("weight_decay", "momentum", "dampening", "eps"):
            v = getattr(self, name)
            if not v >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        RULES[self.rule].check(self)


# name -> default of every rule hyperparameter (the StepConfig fields after ``maximize``)
HPARAMS: dict[str, object] = {f.name: f.default for f in fields(StepConfig)[3:]}


@dataclass(frozen=True)
class Rule:
    """A registered update rule (see the module docstring)."""

    name: str
    id: int
    hparams: tuple[str, ...]
    state: tuple[str, ...]  # every state key it may use: element-wise buffers in row order, then "step"
    state_keys: Callable[[StepConfig], list[str]]  # the ones a given configuration uses
    slots: Callable[[StepConfig], tuple[float, ...]]
    flags: Callable[[StepConfig], tuple[int, ...]]
    check: Callable[[StepConfig], None]

    @property
    def buffers(self) -> tuple[str, ...]:
        """The element-wise state keys, in row order (STATE0, STATE1, STATE_MAX)."""
        return tuple(k for k in self.state if k != "step")


def _check_sgd(cfg: StepConfig) -> None:
    if cfg.nesterov and (cfg.momentum <= 0 or cfg.dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")


def _check_adamw(cfg: StepConfig) -> None:
    if not (0.0 <= cfg.betas[0] < 1.0 and 0.0 <= cfg.betas[1] < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {cfg.betas}")


def _check_classp(cfg: StepConfig) -> None:
    if not (math.isfinite(cfg.threshold) and cfg.threshold >= 0.0):
        raise ValueError(f"threshold must be a finite number >= 0, got {cfg.threshold}")
    if not (math.isfinite(cfg.power) and cfg.power > 0.0):
        raise ValueError(f"power must be a finite number > 0, got {cfg.power}")


def classp_power_mode(power: float) -> int:
    """0: ``p == 1`` (no powers), 1: ``p == 2`` (square / square root, correctly rounded), 2: any other."""
    return 0 if power == 1.0 else 1 if power == 2.0 else 2


RULES: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Add ``rule`` to :data:`RULES` (ids are dense, in registration order: the CUDA table's index)."""
    if rule.id != len(RULES) or rule.name in RULES:
        raise ValueError(f"rule {rule.name!r}: id must be {len(RULES)} and the name new")
    if len(rule.buffers) > N_STATE_ROWS:
        raise ValueError(f"rule {rule.name!r}: at most {N_STATE_ROWS} state lists besides 'step'")
    unknown = [h for h in rule.hparams if h not in HPARAMS]
    if unknown:
        raise ValueError(f"rule {rule.name!r}: hyperparameters {unknown} are not StepConfig fields")
    RULES[rule.name] = rule
    return rule


register_rule(Rule(
    "sgd", 0, ("weight_decay", "momentum", "dampening", "nesterov", "init_momentum"), ("momentum_buffer",),
    state_keys=lambda c: ["momentum_buffer"] if c.momentum != 0 else [],
    # 1 - dampening formed in double, as torch's alpha=1 - dampening
    slots=lambda c: (c.weight_decay, c.momentum, 1.0 - c.dampening),
    flags=lambda c: (c.weight_decay != 0, c.momentum != 0, c.nesterov, c.init_momentum),
    check=_check_sgd,
))  # fmt: skip
register_rule(Rule(
    "adamw", 1, ("weight_decay", "betas", "eps", "amsgrad"), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
    state_keys=lambda c: ["exp_avg", "exp_avg_sq", "step"] + (["max_exp_avg_sq"] if c.amsgrad else []),
    slots=lambda c: (c.weight_decay, c.betas[0], c.betas[1], c.eps),
    flags=lambda c: (c.weight_decay != 0, c.amsgrad),
    check=_check_adamw,
))  # fmt: skip
register_rule(Rule(
    "classp", 2, ("threshold", "power", "eps", "apply_scaling"), ("acc", "step"),
    state_keys=lambda c: ["acc", "step"],
    slots=lambda c: (c.threshold, c.power, 1.0 / c.power, c.eps),
    flags=lambda c: (c.apply_scaling, classp_power_mode(c.power)),
    check=_check_classp,
))  # fmt: skip


def count_steps_(steps: list[Tensor], found_inf: Tensor | None) -> None:
    """``step += 1`` for every 0-d counter, unless ``found_inf`` (AMP) is set; no host sync for
    counters on ``found_inf``'s device. For rules whose counters no kernel reads."""
    by_dev: dict[torch.device, list[Tensor]] = {}
    for s in steps:
        by_dev.setdefault(s.device, []).append(s)
    for dev, ss in by_dev.items():
        if found_inf is None:
            torch._foreach_add_(ss, 1.0)
        else:
            inc = (found_inf.reshape(()).to(dev) == 0).to(ss[0].dtype)
            torch._foreach_add_(ss, [inc] * len(ss))
