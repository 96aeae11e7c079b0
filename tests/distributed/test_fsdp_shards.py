"""FSDP2 (fully_shard, DTensor Shard(0), even and uneven) on 2 gloo ranks vs the same model in 1 process."""

from __future__ import annotations

import pytest
from dist_launch import assert_checks

pytestmark = pytest.mark.distributed

CHECKS = [
    "fisher_equal",  # max relative difference < 1e-4 (the ranks' mean gradients vs one batch's)
    "ratio_mask_identical",
    "topk_identical",  # bit for bit, with ties across shard boundaries, exactly k bits over both ranks
    "clip_scale_equal",  # relative difference < 1e-5 (fp32 gram partials summed in fp64)
    "adamw_10_steps_close",  # 10 masked, clipped 2-role AdamW steps: max |diff| < 1e-5
    "state_is_sharded",
    "sgd_3_steps_close",  # SGD momentum/nesterov, grad-mode mask on one role, clipped: max |diff| < 1e-5
    "noise_identical_exact_True",  # RandomPerturb: bit-identical noise, bit-exact removal
    "noise_identical_exact_False",  # regenerated-noise removal, bit-identical to one process
]


@pytest.mark.parametrize("name", CHECKS)
def test_fsdp_matches_one_process(two_rank_job: list[dict], name: str) -> None:
    assert_checks(two_rank_job, "fsdp", [name])


def test_bytes_per_step(two_rank_job: list[dict]) -> None:
    m = two_rank_job[0]["fsdp"]["measured"]
    # Clip: one fp64 [R, R] gram (R = 2 roles). Top-k (fp32 scores): 4 radix passes of 256 int64
    # counts (+1 NaN count on the first) and one int64 [world, tensors] tie-count table.
    assert m["clip_bytes"] == 2 * 2 * 8
    assert m["topk_bytes"] == (4 * 256 + 1) * 8 + 2 * m["topk_tensors"] * 8
    # Noise: the row norm of each sharded 1-D tensor (3 biases), one fp64 each, in one all-reduce.
    assert m["noise_bytes"] == 3 * 8


@pytest.mark.parametrize("name", ["pnm_alpha_equal", "pnm_weights_close"])
def test_perturb_merge_on_shards(two_rank_job: list[dict], name: str) -> None:
    # PerturbMerge(AdamW), 3 tasks: merge coefficients (rel. diff < 1e-4) and weights (< 1e-5).
    assert_checks(two_rank_job, "pnm", [name])
    assert two_rank_job[0]["pnm"]["measured"]["merge_bytes"] == 2 * 8  # (num, den) in fp64
