"""Triton update rules, one file per rule of :data:`fastclu.ops.rules.RULES`.

Each ``<rule>.py`` defines ``update``: a Triton function with the signature below, called by
the fused combine kernel (passed as its constexpr ``RULE``) once the shared prologue has formed
the step's gradient ``g``. It returns the new fp32 weights and stores its own state, writing
only where ``go`` (the update-mode mask and the AMP skip) allows. The rule's state lists are
the table rows ``ROW_STATE0``, ``ROW_STATE1``, ``ROW_STATE_MAX`` (:mod:`._rows`); ``coef`` holds per-tensor
fp32 coefficients a rule may need (AdamW: step size and sqrt of bias correction 2)::

    update(theta, g, lr32, lr64, tab, LAYOUT, t, offs, m, go, coef, wd, momentum,
           one_minus_damp, b1_hi, b1_lo, b2_hi, b2_lo, eps, HAS_WD, HAS_MOM, NESTEROV,
           INIT_MOM, AMSGRAD, DB0, DB1, DB2, ALIGN) -> theta
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def update_of(rule: str) -> Callable:
    """``fastclu.ops.triton.rules.<rule>.update``."""
    return importlib.import_module(f"fastclu.ops.triton.rules.{rule}").update
