"""The combine table's operand rows (:class:`fastclu.ops.tables.CombineRow`) as Triton constexprs."""

from __future__ import annotations

import triton.language as tl

from fastclu.ops.tables import CombineRow

ROW_PARAM = tl.constexpr(int(CombineRow.PARAM))
ROW_RESTORE = tl.constexpr(int(CombineRow.RESTORE))
ROW_GRAD0 = tl.constexpr(int(CombineRow.GRAD0))
ROW_MASK = tl.constexpr(int(CombineRow.MASK))
ROW_STATE0 = tl.constexpr(int(CombineRow.STATE0))
ROW_STATE1 = tl.constexpr(int(CombineRow.STATE1))
ROW_STATE_MAX = tl.constexpr(int(CombineRow.STATE_MAX))
ROW_IMPORTANCE = tl.constexpr(int(CombineRow.IMPORTANCE))
ROW_ANCHOR = tl.constexpr(int(CombineRow.ANCHOR))
ROW_STEP = tl.constexpr(int(CombineRow.STEP))
