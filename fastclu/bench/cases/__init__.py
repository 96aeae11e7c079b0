"""One benchmark case module per op, named as the op is (``cases/combine_step_.py`` for
``ops.combine_step_``); :data:`CASES` maps each case name to its :class:`Case`, in op order."""

from __future__ import annotations

from fastclu.bench.cases import (
    combine_step_,
    fd_hvp_,
    fisher_accumulate_,
    gram,
    lerp_sync_,
    merge_,
    merge_stats,
    perturb_,
    ratio_mask,
    restore_,
    soup_coef_grads,
    soup_combine_,
    topk_mask,
)
from fastclu.bench.cases._common import Case, Data, Step

# Op order of the contract (DESIGN §3), which is also the order of tables and plots.
_OP_MODULES = (
    fisher_accumulate_, ratio_mask, topk_mask, gram, combine_step_, lerp_sync_, perturb_, restore_, fd_hvp_,
    merge_stats, merge_, soup_combine_, soup_coef_grads,
)  # fmt: skip
CASES: dict[str, Case] = {c.name: c for m in _OP_MODULES for c in m.CASES}
ALL_PEERS = ("loop", "foreach", "compile", "torch_fused", "cat_topk", "cat_kthvalue")

__all__ = ["ALL_PEERS", "CASES", "Case", "Data", "Step"]
