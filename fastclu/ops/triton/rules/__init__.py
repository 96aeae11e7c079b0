"""Triton update rules, one file per rule of :data:`fastclu.ops.rules.RULES`.

Each ``<rule>.py`` defines ``update``: a Triton function with the signature below, called by
the fused combine kernel (passed as its constexpr ``RULE``) once the shared prologue has formed
the step's gradient ``g``. It returns the new fp32 weights and stores its own state: loads
under ``m`` (in bounds and not an AMP-skipped step, block-uniform), new values only where
``go`` (``m`` and the update-mode mask), so it stores ``tl.where(go, new, loaded)`` under
``m`` (a frozen entry keeps its loaded bits; the store stays vectorised). Its state lists are the table
rows ``ROW_STATE0``, ``ROW_STATE1``, ``ROW_STATE_MAX`` (:mod:`.._rows`) in the order of
:attr:`fastclu.ops.rules.Rule.buffers`; ``dB0..dB2`` their element types. Its hyperparameters
arrive as the rule's slots (:attr:`fastclu.ops.rules.StepConfig.slots`): slot ``k`` is the fp32
value ``hk`` and its remainder ``hk_lo`` (``_multitensor.f64(hk, hk_lo)`` is the double), and its
switches as the constexprs ``F0..F3``; ``coef`` holds per-tensor fp32 coefficients formed by the
rule's ``prepare`` hook (AdamW: step size and sqrt of bias correction 2)::

    update(theta, g, lr32, lr64, tab, LAYOUT, t, offs, m, go, coef,
           h0, h0_lo, h1, h1_lo, h2, h2_lo, h3, h3_lo, h4, h4_lo, h5, h5_lo,
           F0, F1, F2, F3, DB0, DB1, DB2, ALIGN) -> theta

A rule file may also define the host hook ``prepare(steps, cfg, lr, found_inf, dev)`` (see
:func:`count_steps`, the default): it runs before the table is built and returns the step
counters the table's STEP row should carry (or None) and a per-group function
``coef(launch: GroupLaunch) -> Tensor | None`` (or None) giving that group's ``coef`` array.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from fastclu.ops.rules import StepConfig, count_steps_


@dataclass(frozen=True)
class GroupLaunch:
    """What a rule's per-group ``coef`` function gets: one launch group and the step's scalars."""

    group: object  # fastclu.ops.triton._multitensor.Group
    dev: torch.device
    lr: tuple[Tensor, float, float, float, bool]  # (pointer, value, hi, lo, is a device tensor)
    found_inf: Tensor | None  # on dev, or None
    dummy: Tensor  # any device tensor, for absent pointers
    step_dtype: object  # the STEP row's Triton element type


def split_double(x: float) -> tuple[float, float]:
    """A double as two fp32 values whose sum carries ~48 bits (kernel float args are fp32)."""
    hi = float(np.float32(x))
    return hi, x - hi


def module_of(rule: str) -> ModuleType:
    return importlib.import_module(f"fastclu.ops.triton.rules.{rule}")


def update_of(rule: str) -> Callable:
    """``fastclu.ops.triton.rules.<rule>.update``."""
    return module_of(rule).update


def count_steps(
    steps: list[Tensor] | None, cfg: StepConfig, lr: float | Tensor, found_inf: Tensor | None, dev: torch.device
) -> tuple[list[Tensor] | None, Callable | None]:
    """The default ``prepare``: counters (if the rule keeps any) incremented, nothing for the kernel."""
    if steps:
        count_steps_(steps, found_inf)
    return None, None


def prepare_of(rule: str) -> Callable:
    """The rule's host hook ``prepare``, or :func:`count_steps`."""
    return getattr(module_of(rule), "prepare", count_steps)
