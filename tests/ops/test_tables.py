"""The combine table's operand rows are named once (fastclu.ops.tables) and agree with the C++ kernels."""

from __future__ import annotations

import contextlib

import pytest
from _cpu_module import cpu_module_unbuildable

from fastclu.ops import _table
from fastclu.ops.tables import COMBINE_OPERANDS, TABLES, CombineRow, combine_operands


def _extensions() -> list:
    """Every C++ build here: fastclu._C (nvcc) if built, and the CPU test module (built on demand)."""
    import importlib

    from fastclu.ops import _cuda_cpu_mode

    mods = []
    with contextlib.suppress(ImportError):
        mods.append(importlib.import_module("fastclu._C"))
    cpu_module_unbuildable()  # builds it, or leaves fastclu._C alone to check
    with contextlib.suppress(ImportError):
        mods.append(_cuda_cpu_mode.load_extension())
    if not mods:
        pytest.skip("no C++ build of the kernels here")
    return mods


def test_rows_match_the_extension() -> None:
    for C in _extensions():
        assert {r.name.lower(): int(r) for r in CombineRow} == dict(C.COMBINE_ROWS)
        assert int(C.COMBINE_OPERANDS) == COMBINE_OPERANDS


def test_every_table_matches_the_extension() -> None:
    """Every op's operand rows, operand count and the row header width agree with csrc/ops.h."""
    for C in _extensions():
        assert int(C.ROW_HEADER) == _table.HEADER
        tables = {k: dict(v) for k, v in dict(C.TABLE_ROWS).items()}
        assert set(tables) | {"combine_step"} == set(TABLES)
        for name, want in tables.items():
            spec = TABLES[name]
            assert {r.name.lower(): int(r) for r in spec.rows} == want, name
            assert int(C.TABLE_OPERANDS[name]) == spec.n_operands, name
        assert TABLES["combine_step"].n_operands == int(C.COMBINE_OPERANDS)


def test_per_step_operands_are_rows_of_their_table() -> None:
    for name, spec in TABLES.items():
        assert all(0 <= k < spec.n_operands for k in spec.dynamic), name
        assert len(set(spec.dynamic)) == len(spec.dynamic), name


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
