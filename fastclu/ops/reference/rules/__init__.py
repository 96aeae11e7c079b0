"""Reference update rules, one file per rule of :data:`fastclu.ops.rules.RULES`."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def update_of(rule: str) -> Callable:
    """``fastclu.ops.reference.rules.<rule>.update``."""
    return importlib.import_module(f"fastclu.ops.reference.rules.{rule}").update
