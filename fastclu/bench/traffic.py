"""Byte budgets (DESIGN §3): the floor traffic of each case, from which GB/s is computed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GB = 1e9

# --------------------------------------------------------------------------------------------
# Byte budgets (DESIGN §3): passes over each tensor class, per element.
#   "p": tensors in the benchmarked dtype (params, grads, directions, scores) -> itemsize bytes
#   "s": fp32 optimizer state / accumulators                                    -> 4 bytes
#   "m": bit-packed masks                                                       -> 1/8 byte
# A read-modify-write counts 2 passes. These are floors: an implementation that reads a
# tensor twice still gets credited with one pass, so its GB/s is "effective", not raw.
# --------------------------------------------------------------------------------------------
TRAFFIC: dict[str, dict[str, int]] = {
    # fisher (s) read+write, grad (p) read
    "fisher_accumulate_": {"p": 1, "s": 2},
    # F_f, F_r read; mask written
    "ratio_mask": {"p": 2, "m": 1},
    # one histogram pass + the mask-writing pass over the scores (DESIGN: 8, +4 per extra select pass)
    "topk_mask": {"p": 2, "m": 1},
    # R = 2 role grads read once, mask read
    "gram": {"p": 2, "m": 1},
    # R = 1: grad read, param read+write, momentum read+write   (4R + 16)
    "combine_step_sgd": {"p": 3, "s": 2},
    # R = 2 (forget masked, remain unmasked): 2 grads, param rw, momentum rw, mask  (4R + 16)
    "combine_step_sgd_masked": {"p": 4, "s": 2, "m": 1},
    # R = 1: grad read, param rw, exp_avg rw, exp_avg_sq rw   (4R + 24)
    "combine_step_adamw": {"p": 3, "s": 4},
    # R = 2, AdamW, clipped: gram pass (2 grads + mask) + the masked step (2 grads, param rw,
    # exp_avg rw, exp_avg_sq rw, mask)   (DESIGN §5: 40.3 B/elem in fp32)
    "combine_step_adamw_masked_clipped": {"p": 6, "s": 4, "m": 2},
    # slow (fp32 master) rw, fast read + write
    "lerp_sync_": {"p": 2, "s": 2},
    # param rw, anchor read, backup write
    "perturb_anchor": {"p": 4},
    # row-norm pass over param, param rw, backup write (DESIGN: 12-16)
    "perturb_noise": {"p": 4},
    # backup read, param write
    "restore_": {"p": 2},
    # g+ read, g- read, out write
    "fd_hvp_": {"p": 3},
    # param, anchor read; fisher_sum, fisher_theta_sum (s) read
    "merge_stats": {"p": 2, "s": 2},
    # param rw, anchor read
    "merge_": {"p": 3},
    # K = 3: out write, base read, 3 differences read
    "soup_combine_": {"p": 5},
    # K = 3: grads read, 3 differences read (the [K, L] result is negligible)
    "soup_coef_grads": {"p": 4},
}


def _traffic(case: str) -> dict[str, int]:
    if case not in TRAFFIC:
        raise ValueError(f"case must be one of {list(TRAFFIC)}, got {case!r}")
    return TRAFFIC[case]


def bytes_per_element(case: str, dtype: torch.dtype) -> float:
    """Floor traffic of ``case`` in bytes per parameter element (mask bits as 1/8 byte)."""
    t = _traffic(case)
    isz = torch.empty((), dtype=dtype).element_size()
    return t.get("p", 0) * isz + t.get("s", 0) * 4 + t.get("m", 0) / 8


def case_bytes(case: str, shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> int:
    """Exact floor traffic of one call of ``case`` on tensors of ``shapes`` (packed masks rounded up)."""
    t = _traffic(case)
    isz = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in shapes:
        n = math.prod(s)
        total += t.get("p", 0) * isz * n + t.get("s", 0) * 4 * n + t.get("m", 0) * ((n + 7) // 8)
    return total
