"""DDP on 2 gloo ranks: Fishers reduced over the process group, rank-local scores refused, SFR-on in sync."""

from __future__ import annotations

import pytest
from dist_launch import assert_checks

pytestmark = pytest.mark.distributed

CHECKS = [
    "ddp_fisher_equals_one_process",  # relative difference < 1e-5 (summation order)
    "rank_local_score_is_an_error",  # ratio_mask / topk_mask of per-rank Fishers raise ValueError
    "rank_local_mask_when_asked",  # group=distributed.LOCAL computes the per-rank mask
    "sfron_bit_identical_on_ranks",  # methods.sfron on DDP: same weights and mask density, bit for bit
]


@pytest.mark.parametrize("name", CHECKS)
def test_ddp(two_rank_job: list[dict], name: str) -> None:
    assert_checks(two_rank_job, "ddp", [name])
