"""PyTorch's own optimizer test cases (``optim_db``) for fastclu's SGD and AdamW, shared by the tests.

torch's testing package imports ``expecttest`` only for a TestCase base class; where it is not
installed a stand-in module is registered first.
"""

from __future__ import annotations

import sys
import types
import unittest

import torch

import fastclu.optim

if "expecttest" not in sys.modules:
    try:
        import expecttest  # noqa: F401
    except ImportError:
        _stub = types.ModuleType("expecttest")
        _stub.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        sys.modules["expecttest"] = _stub

from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

INFOS = {o.name: o for o in optim_db if o.name in ("SGD", "AdamW")}
OURS = {"SGD": fastclu.optim.SGD, "AdamW": fastclu.optim.AdamW}
TORCH = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}

__all__ = ["INFOS", "OURS", "TORCH", "OptimizerErrorEnum", "optim_db"]
