"""Operand rows of the multi-tensor tables, named once for both kernel backends.

A fused launch reads, per tensor, one address per operand; the row of each operand is fixed
here and used by the Triton host code and kernels, the CUDA host code, and (checked by
tests/ops/test_tables.py against ``fastclu._C.COMBINE_ROWS`` / ``TABLE_ROWS``) the C++ kernels'
enums in ``csrc/ops.h``. :data:`TABLES` also declares, per table, which operands are *per-step*
(their addresses change from call to call: gradients, outputs allocated per call): those travel
in the table's small pointer array and never cause a rebuild (:mod:`fastclu.ops._table`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


class FisherRow(enum.IntEnum):
    FISHER = 0
    GRAD = 1


class RatioRow(enum.IntEnum):
    F_FORGET = 0
    F_REMAIN = 1
    OUT = 2  # the packed mask, allocated per call


class TopkRow(enum.IntEnum):
    SCORES = 0
    OUT = 1


class LerpRow(enum.IntEnum):
    SLOW = 0
    FAST = 1


class HvpRow(enum.IntEnum):
    OUT = 0
    GRAD_PLUS = 1
    GRAD_MINUS = 2


class MergeRow(enum.IntEnum):
    PARAM = 0
    ANCHOR = 1


class MergeStatsRow(enum.IntEnum):
    PARAM = 0
    ANCHOR = 1
    FISHER_SUM = 2
    FISHER_THETA_SUM = 3


class PerturbRow(enum.IntEnum):
    PARAM = 0
    BACKUP = 1
    SOURCE = 2  # anchor (task vector), direction, or fp32 row norms (noise)


class RowNormRow(enum.IntEnum):
    PARAM = 0
    NORMS = 1


class GramRow(enum.IntEnum):
    GRAD0 = 0  # role r at GRAD0 + r, r < 4
    MASK = 4


class RestoreRow(enum.IntEnum):
    PARAM = 0
    BACKUP = 1


SOUP_MAX_DIFFS = 12  # ingredient differences per soup table (fastclu.ops.SOUP_MAX_INGREDIENTS)


class SoupCombineRow(enum.IntEnum):
    OUT = 0
    BASE = 1
    DIFF0 = 2  # ingredient k at DIFF0 + k, k < 12


class SoupGradRow(enum.IntEnum):
    GRADS = 0
    DIFF0 = 1  # ingredient k at DIFF0 + k, k < 12


@dataclass(frozen=True)
class TableSpec:
    """One table: its named rows, operand count and per-step operands (by row)."""

    rows: type[enum.IntEnum]
    n_operands: int
    dynamic: tuple[int, ...]


# Keys: the C++ entry point (``fastclu._C.TABLE_ROWS``; ``perturb`` serves perturb_dir and
# perturb_noise). Per-step: what a training loop hands over fresh each call. Stable: params,
# optimizer state, masks, Fishers, anchors (a changed one is a rebuild, as a new parameter set).
TABLES: dict[str, TableSpec] = {
    "fisher_accumulate": TableSpec(FisherRow, 2, (FisherRow.GRAD,)),
    "ratio_mask": TableSpec(RatioRow, 3, (RatioRow.OUT,)),
    "topk_mask": TableSpec(TopkRow, 2, (TopkRow.SCORES, TopkRow.OUT)),
    "lerp_sync": TableSpec(LerpRow, 2, ()),
    "fd_hvp": TableSpec(HvpRow, 3, (HvpRow.GRAD_PLUS, HvpRow.GRAD_MINUS)),
    "merge": TableSpec(MergeRow, 2, ()),
    "merge_stats": TableSpec(MergeStatsRow, 4, ()),
    "perturb": TableSpec(PerturbRow, 3, (PerturbRow.BACKUP, PerturbRow.SOURCE)),
    "row_norms": TableSpec(RowNormRow, 2, (RowNormRow.NORMS,)),
    "gram": TableSpec(GramRow, 5, (GramRow.GRAD0, GramRow.GRAD0 + 1, GramRow.GRAD0 + 2, GramRow.GRAD0 + 3)),
    "restore": TableSpec(RestoreRow, 2, (RestoreRow.BACKUP,)),
    # the soup's model parameters, base and ingredient differences stay put for a whole block
    "soup_combine": TableSpec(SoupCombineRow, SoupCombineRow.DIFF0 + SOUP_MAX_DIFFS, ()),
    "soup_coef_grads": TableSpec(SoupGradRow, SoupGradRow.DIFF0 + SOUP_MAX_DIFFS, (SoupGradRow.GRADS,)),
    "combine_step": TableSpec(
        CombineRow, COMBINE_OPERANDS, (CombineRow.RESTORE, *range(CombineRow.GRAD0, CombineRow.MASK))
    ),
}


def dynamic(table: str) -> tuple[int, ...]:
    """The per-step operand rows of ``table`` (see :data:`TABLES`)."""
    return TABLES[table].dynamic
