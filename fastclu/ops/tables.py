"""Operand rows of the multi-tensor tables, named once for both kernel backends.

A fused launch reads, per tensor, one address per operand; the row of each operand is fixed
here and used by the Triton host code and kernels, the CUDA host code, and (checked by a test
against ``fastclu._C.COMBINE_ROWS``) the C++ kernels' ``enum CombineRow`` in ``csrc/ops.h``.
"""

from __future__ import annotations

import enum


class CombineRow(enum.IntEnum):
    """Rows of the ``combine_step_`` table (13 operands)."""

    PARAM = 0
    RESTORE = 1  # restore_from (fused restore)
    GRAD0 = 2  # role r at GRAD0 + r, r < 4
    MASK = 6  # bit-packed mask
    STATE0 = 7  # momentum_buffer (SGD) / exp_avg (AdamW)
    STATE1 = 8  # exp_avg_sq
    STATE_MAX = 9  # max_exp_avg_sq (AMSGrad)
    IMPORTANCE = 10
    ANCHOR = 11
    STEP = 12  # 0-d step counters (a pointer each)


COMBINE_OPERANDS = 13


def combine_operands(
    params: list,
    restore_from: list | None,
    roles: list,
    mask: list | None,
    state: list,
    importance: list | None,
    anchor: list | None,
    steps: list | None,
) -> list:
    """The combine table's operand lists in :class:`CombineRow` order (None: absent).

    ``roles``: up to 4 role lists; ``state``: up to 3 state lists (STATE0, STATE1, STATE_MAX).
    """
    out: list = [None] * COMBINE_OPERANDS
    out[CombineRow.PARAM] = params
    out[CombineRow.RESTORE] = restore_from
    for r, g in enumerate(roles):
        out[CombineRow.GRAD0 + r] = g
    out[CombineRow.MASK] = mask
    for k, s in enumerate(state):
        out[CombineRow.STATE0 + k] = s
    out[CombineRow.IMPORTANCE] = importance
    out[CombineRow.ANCHOR] = anchor
    out[CombineRow.STEP] = steps
    return out
