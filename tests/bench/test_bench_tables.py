"""The table host-cost benchmark runs end to end (its times are not asserted, its sizes are)."""

from __future__ import annotations

from fastclu.bench import tables as bt
from fastclu.ops import _table
from fastclu.ops.tables import COMBINE_OPERANDS


def test_table_bench_rows_and_sizes(capsys) -> None:
    for backend in ("triton", "cuda"):
        row = bt.measure("resnet18", backend, repeats=2)
        assert row["tensors"] == 62 and row["elements"] > 11_000_000
        assert all(row[k] > 0 for k in ("miss_ms", "hit_ms", "moved_ms"))
        # O(tensors): one row per tensor (and at most one tail entry each), not one per block
        assert row["table_int64s"] <= row["tensors"] * (_table.HEADER + COMBINE_OPERANDS + 1)
    assert bt.main(["--models", "resnet18", "--backends", "cuda", "--repeats", "1"]) == 0
    assert "resnet18" in capsys.readouterr().out
    assert bt.main(["--models", "nope"]) == 2
