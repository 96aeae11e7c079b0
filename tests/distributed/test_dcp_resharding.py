"""torch.distributed.checkpoint: fastclu optimizer + wrapper state saved on 2 FSDP2 ranks, loaded on 2 and on 1.

The saving run: FastSlow(PerturbMerge(AdamW)) with a top-k mask, an anchor penalty, 4 masked
clipped 2-role steps (P&M-perturbed, a task merged after the second) and a pending stash,
checkpointed, then 4 more steps with another merge (the uninterrupted reference). The loading
runs start from other weights, load, and take the same 4 steps: slow weights, P&M statistics,
anchors, its RNG, masks and the stash must all come from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_launch import assert_checks, run_job

pytestmark = pytest.mark.distributed

CHECKS = ["stash_restored", "mask_restored", "continues_like_uninterrupted"]


def test_save_on_2_load_on_2(two_rank_job: list[dict]) -> None:
    assert_checks(two_rank_job, "dcp_save", ["saved"])
    assert_checks(two_rank_job, "dcp_load", CHECKS)  # bit-identical to the uninterrupted run


def test_save_on_2_load_on_1(two_rank_job: list[dict], dist_base: Path) -> None:
    assert_checks(two_rank_job, "dcp_save", ["saved"])
    one = run_job("dcp_load", dist_base / "load1", world=1, env={"DCP_DIR": str(dist_base / "ckpt")})
    assert_checks(one, "dcp_load", CHECKS)  # unsharded reductions: max |diff| < 1e-5
