"""The traffic model: byte budgets per case against DESIGN §3."""

from __future__ import annotations

import pytest
import torch
from _bench_expect import BF16, DESIGN_FP32, MASKED

from fastclu import bench


def test_traffic_table_matches_design() -> None:
    assert set(bench.TRAFFIC) == set(DESIGN_FP32) == set(bench.CASES)
    for case, want in DESIGN_FP32.items():
        mask = 1 / 8 if case in MASKED else 0
        assert bench.bytes_per_element(case, torch.float32) == pytest.approx(want + mask), case
    for case, want in BF16.items():
        mask = 1 / 8 if case in MASKED else 0
        assert bench.bytes_per_element(case, torch.bfloat16) == pytest.approx(want + mask), case
    with pytest.raises(ValueError, match="case"):
        bench.bytes_per_element("not_an_op", torch.float32)
    # Packed masks round up per tensor: 3 tensors of 9 elements hold 3 * 2 mask bytes.
    assert bench.case_bytes("ratio_mask", [(9,), (3, 3), (9, 1)], torch.float32) == 3 * (9 * 8 + 2)
