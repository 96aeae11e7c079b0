"""fastclu: fused optimizers for continual learning and machine unlearning."""

from __future__ import annotations

from fastclu._registry import backends, use_backend
from fastclu.perturb import hvp  # light: fastclu.ops imports no backend (no triton)

__version__ = "0.1.0"

__all__ = ["__version__", "backends", "hvp", "use_backend"]
