"""Reference update rules, one file per rule of :data:`fastclu.ops.rules.RULES`.

Each file has ``update(theta, g, bufs, step, cfg)`` (one tensor: the specification, in torch's
single-tensor op order) and ``update_foreach(thetas, gs, bufs, steps, cfg)`` (lists, on
``torch._foreach_*``, in torch's multi-tensor op order). A rule that a torch fused kernel computes
also has ``update_fused(thetas, gs, bufs, steps, cfg, *, found_inf)`` and ``fused_eligible(thetas,
bufs, steps, cfg, device)`` (which (device, dtype) groups that kernel computes exactly).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple


def update_of(rule: str) -> Callable:
    """``fastclu.ops.reference.rules.<rule>.update``."""
    return importlib.import_module(f"fastclu.ops.reference.rules.{rule}").update


def update_foreach_of(rule: str) -> Callable | None:
    """``fastclu.ops.reference.rules.<rule>.update_foreach`` (None if the rule has no list form)."""
    return getattr(importlib.import_module(f"fastclu.ops.reference.rules.{rule}"), "update_foreach", None)


class Fused(NamedTuple):
    """A rule's fused formulation: ``eligible(thetas, bufs, steps, cfg, device)`` and ``update``."""

    eligible: Callable[..., bool]
    update: Callable[..., None]


def update_fused_of(rule: str) -> Fused | None:
    """``fastclu.ops.reference.rules.<rule>``'s ``fused_eligible`` and ``update_fused`` (None if it has none)."""
    mod = importlib.import_module(f"fastclu.ops.reference.rules.{rule}")
    update = getattr(mod, "update_fused", None)
    return None if update is None else Fused(mod.fused_eligible, update)
