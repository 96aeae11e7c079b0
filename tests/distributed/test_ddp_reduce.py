"""DDP on 2 gloo ranks: Fishers reduced over the process group, rank-local scores refused, SFR-on in sync."""

from __future__ import annotations

import pytest
from dist_launch import run_job

pytestmark = pytest.mark.distributed

CHECKS = [
    "ddp_fisher_equals_one_process",  # relative difference < 1e-5 (summation order)
    "rank_local_score_is_an_error",  # ratio_mask / topk_mask of per-rank Fishers raise ValueError
    "rank_local_mask_when_asked",  # group=distributed.LOCAL computes the per-rank mask
    "sfron_bit_identical_on_ranks",  # methods.sfron on DDP: same weights and mask density, bit for bit
]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_job("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("name", CHECKS)
def test_ddp(ddp_results: list[dict], name: str) -> None:
    for rank, res in enumerate(ddp_results):
        c = res["checks"][name]
        assert c["ok"], f"rank {rank}: {name} failed: {c['detail']}"
