"""Reference update rules, one file per rule of :data:`fastclu.ops.rules.RULES`.

Each file has ``update(theta, g, bufs, step, cfg)`` (one tensor: the specification, in torch's
single-tensor op order) and ``update_foreach(thetas, gs, bufs, steps, cfg)`` (lists, on
``torch._foreach_*``, in torch's multi-tensor op order).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def update_of(rule: str) -> Callable:
    """``fastclu.ops.reference.rules.<rule>.update``."""
    return importlib.import_module(f"fastclu.ops.reference.rules.{rule}").update


def update_foreach_of(rule: str) -> Callable | None:
    """``fastclu.ops.reference.rules.<rule>.update_foreach`` (None if the rule has no list form)."""
    return getattr(importlib.import_module(f"fastclu.ops.reference.rules.{rule}"), "update_foreach", None)
