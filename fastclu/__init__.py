"""fastclu: fused optimizers for continual learning and machine unlearning."""

from __future__ import annotations

from fastclu._registry import backends

__version__ = "0.1.0"

__all__ = ["backends", "__version__"]
