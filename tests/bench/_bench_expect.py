"""Expected byte budgets (from DESIGN §3, by hand) and the report loader shared by the bench tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# DESIGN §3, fp32 bytes per element (R = 2 for gram and the masked step, R = 1 for the plain steps;
# 16 for perturb_: the upper end of its 12-16 range, anchor read / row-norm pass included).
DESIGN_FP32 = {
    "fisher_accumulate_": 12, "ratio_mask": 8, "topk_mask": 8, "gram": 4 * 2,
    "combine_step_sgd": 4 * 1 + 16, "combine_step_sgd_masked": 4 * 2 + 16, "combine_step_adamw": 4 * 1 + 24,
    "combine_step_adamw_masked_clipped": 8 + 1 / 8 + 4 * 2 + 24,  # gram pass (its own mask read) + step
    "lerp_sync_": 16, "perturb_anchor": 16, "perturb_noise": 16, "restore_": 8, "fd_hvp_": 12,
    "merge_stats": 16, "merge_": 12, "soup_combine_": 4 * (2 + 3), "soup_coef_grads": 4 * (1 + 3),
}  # fmt: skip
MASKED = {"ratio_mask", "topk_mask", "gram", "combine_step_sgd_masked", "combine_step_adamw_masked_clipped"}
# bf16 parameters/grads with fp32 state, derived by hand from the tensors each op touches.
BF16 = {"fisher_accumulate_": 2 + 8, "combine_step_sgd": 2 + 4 + 8, "combine_step_adamw": 2 + 4 + 16,
        "topk_mask": 2 + 2, "lerp_sync_": 8 + 4, "merge_stats": 4 + 8}  # fmt: skip


def _load_report():
    spec = importlib.util.spec_from_file_location("fastclu_bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
