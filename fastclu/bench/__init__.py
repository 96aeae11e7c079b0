"""Microbenchmarks of the fastclu ops against every peer, with a copy roofline (``fastclu bench``).

Every op of :mod:`fastclu.ops` is timed per backend (reference, triton, cuda: whichever run
here), dtype and size, next to the same math written the ways a user would write it instead
(a Python loop over parameters, ``torch._foreach_*``, ``torch.compile`` of the loop,
``torch.optim`` with ``fused=True`` where the math coincides) and next to a device-to-device
copy of the same number of bytes: the bandwidth roofline measured in the same run.

Effective bandwidth is ``bytes / time`` where ``bytes`` is the op's floor traffic from DESIGN §3
(:data:`TRAFFIC`), the same for every implementation of a case, so GB/s ratios are speed-ups.

On a machine without a CUDA device only the reference backend and the peers run, on tiny
sizes, to check the harness; the results then say ``gpu_skipped: true`` and are no timing claim.

Layout (one concern per module):

- :mod:`~fastclu.bench.traffic`: bytes per element per case (the traffic model);
- :mod:`~fastclu.bench.shapes`: ResNet-18, ViT-B/16 and GPT-2 124M parameter shape lists, size sweeps;
- :mod:`~fastclu.bench.cases`: one module per op, named as the op (``cases/combine_step_.py``);
- :mod:`~fastclu.bench.timer`: the one timer (device time; host time for ``--host``), peak memory, the copy roofline;
- :mod:`~fastclu.bench.runner`: the op grid and DESIGN §5 targets;
- :mod:`~fastclu.bench.e2e`: end-to-end SFR-on and P&M steps;
- :mod:`~fastclu.bench.host`: host time per step with kernel launches stubbed (``--host``);
- :mod:`~fastclu.bench.report`: metadata, table, plot;
- :mod:`~fastclu.bench.cli`: ``fastclu bench``.

This package namespace re-exports what scripts and tests use (``from fastclu import bench``).
"""

from __future__ import annotations

from fastclu._registry import BACKENDS
from fastclu.bench.cases import ALL_PEERS, CASES, Case, Data, Step
from fastclu.bench.cases._common import (
    ADAM_EPS,
    ADAM_LR,
    ADAM_WD,
    BETAS,
    LR,
    MOMENTUM,
    WD,
    _leaf_params,
)
from fastclu.bench.cli import _csv, _parse_sizes, _select_cases, build_parser, main
from fastclu.bench.e2e import (
    PM_EPS,
    SFR_ALPHA,
    SFR_CLIP,
    SFR_LR,
    ResNet18,
    e2e_pm,
    e2e_sfr_on,
    pm_fastclu_step,
    pm_torch_step,
    run_e2e,
    sfr_on_fastclu_step,
    sfr_on_torch_step,
)
from fastclu.bench.report import SCHEMA_VERSION, environment, format_table, plot, results_name
from fastclu.bench.runner import DTYPES, Config, _derive, _usable_backends, check_targets, run_ops
from fastclu.bench.shapes import (
    CPU_LOG2_SIZES,
    DEFAULT_LOG2_SIZES,
    MODEL_SHAPES,
    QUICK_GPU_LOG2_SIZES,
    gpt2_shapes,
    resnet18_shapes,
    size_shapes,
    split_shapes,
    vit_b16_shapes,
)
from fastclu.bench.timer import _peak_extra, _sync, copy_step, time_fn
from fastclu.bench.traffic import GB, TRAFFIC, bytes_per_element, case_bytes

__all__ = [
    "ADAM_EPS", "ADAM_LR", "ADAM_WD", "ALL_PEERS", "BACKENDS", "BETAS", "CASES", "CPU_LOG2_SIZES",
    "DEFAULT_LOG2_SIZES", "DTYPES", "GB", "LR", "MODEL_SHAPES", "MOMENTUM", "PM_EPS", "QUICK_GPU_LOG2_SIZES",
    "SCHEMA_VERSION", "SFR_ALPHA", "SFR_CLIP", "SFR_LR", "TRAFFIC", "WD", "Case", "Config", "Data", "ResNet18",
    "Step", "_csv", "_derive", "_leaf_params", "_parse_sizes", "_peak_extra", "_select_cases", "_sync",
    "_usable_backends", "build_parser", "bytes_per_element", "case_bytes", "check_targets", "copy_step",
    "e2e_pm", "e2e_sfr_on", "environment", "format_table", "gpt2_shapes", "main", "plot", "pm_fastclu_step",
    "pm_torch_step", "resnet18_shapes", "results_name", "run_e2e", "run_ops", "sfr_on_fastclu_step",
    "sfr_on_torch_step", "size_shapes", "split_shapes", "time_fn", "vit_b16_shapes",
]  # fmt: skip
