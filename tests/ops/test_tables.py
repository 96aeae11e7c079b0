"""The combine table's operand rows are named once (fastclu.ops.tables) and agree with the C++ kernels."""

from __future__ import annotations

import pytest

from fastclu.ops.tables import COMBINE_OPERANDS, CombineRow, combine_operands


def test_rows_match_the_extension() -> None:
    C = pytest.importorskip("fastclu._C")
    assert {r.name.lower(): int(r) for r in CombineRow} == dict(C.COMBINE_ROWS)
    assert int(C.COMBINE_OPERANDS) == COMBINE_OPERANDS


def test_combine_operands_put_each_list_on_its_row() -> None:
    names = ["p", "r", "g0", "g1", "m", "s0", "s1", "s2", "imp", "anc", "st"]
    p, r, g0, g1, m, s0, s1, s2, imp, anc, st = ([n] for n in names)
    ops = combine_operands(p, r, [g0, g1], m, [s0, s1, s2], imp, anc, st)
    assert len(ops) == COMBINE_OPERANDS
    want = {CombineRow.PARAM: p, CombineRow.RESTORE: r, CombineRow.GRAD0: g0, CombineRow.GRAD0 + 1: g1,
            CombineRow.MASK: m, CombineRow.STATE0: s0, CombineRow.STATE1: s1, CombineRow.STATE_MAX: s2,
            CombineRow.IMPORTANCE: imp, CombineRow.ANCHOR: anc, CombineRow.STEP: st}  # fmt: skip
    for row, x in enumerate(ops):
        assert x is want.get(row), row


def test_triton_rows_are_the_named_rows() -> None:
    pytest.importorskip("triton")
    from fastclu.ops.triton import _rows

    for r in CombineRow:
        assert getattr(_rows, f"ROW_{r.name}").value == int(r)
