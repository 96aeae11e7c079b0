"""Validation of scalar arguments (Python numbers and 1-element tensors) before anything moves.

One rule for every public entry point: a scalar is a real number (``int``/``float``/numpy
scalar, not ``bool``) or a 1-element floating tensor; it must be finite and inside the stated
range. Where the check costs nothing it is always done:

* Python and numpy numbers, and 1-element tensors on the CPU, are checked on every call.
* 1-element tensors on an accelerator are checked only where :func:`check_scalar` is called
  with ``sync_ok=True`` (constructors, ``set_anchor``, ``add_param_group``, once-per-task
  calls): reading such a value is a host sync, and a per-step check would cost one every step.
  In per-step calls (``step(combine=..., clip=...)``, group hyper-parameters re-checked each
  step) device tensors are trusted.
* Meta tensors (no value) and values seen while ``torch.compile`` traces are not read (a
  branch on a traced tensor would break the graph); they were checked where they were set.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["check_scalar", "readable"]


def readable(x: Tensor, sync_ok: bool) -> bool:
    """Whether the value of the 1-element tensor ``x`` may be read here (see the module docstring)."""
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu" or sync_ok


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def check_scalar(
    name: str,
    x: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    nonzero: bool = False,
    tensor_ok: bool = True,
    sync_ok: bool = False,
    invalid: str | None = None,
) -> float | Tensor:
    """``x`` as a ``float`` (numbers) or a 0-d tensor (1-element tensors), after checking it.

    Raises ``TypeError`` for a non-number, ``ValueError`` for a non-finite value or one out of
    ``[lo, hi]`` (``lo_open``/``hi_open`` make a bound strict; ``nonzero`` refuses 0), naming
    ``name`` and the expected range (``invalid``, e.g. torch's "Invalid learning rate", starts
    the message where torch's wording is kept). Tensors are returned reshaped to 0-d, not copied.
    """
    if isinstance(x, Tensor):
        if not tensor_ok:
            raise TypeError(f"{name} must be a number, got a tensor")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a number or a 1-element floating tensor, got {x.dtype}")
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(x.shape)}")
        value = float(x.detach().reshape(())) if readable(x, sync_ok) else None
        out: float | Tensor = x.reshape(())
    else:
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a number{' or a 0-d tensor' if tensor_ok else ''}, got {type(x).__name__}")
        value = float(x)
        out = value
    if value is None:
        return out
    bad = not math.isfinite(value)
    bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
    bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
    bad = bad or (nonzero and value == 0.0)
    if bad:
        rng = _range_text(lo, hi, lo_open, hi_open)
        need = "finite" + (f" and {rng}" if rng else "") + (" and nonzero" if nonzero else "")
        if invalid is not None:
            raise ValueError(f"{invalid}: {value} ({name} must be {need})")
        raise ValueError(f"{name} must be {need}, got {value}")
    return out
