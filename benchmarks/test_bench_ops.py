"""Every op x backend x dtype x size, and each peer and the copy roofline, under pytest-benchmark.

Each benchmark times one call (the callable synchronises the device, so the host clock of
pytest-benchmark sees the kernel's time) after warm-up rounds, and records the byte count,
the effective GB/s of the median and the peak extra memory in ``extra_info`` (kept by
``--benchmark-json``). ``fastclu bench`` produces the side-by-side table and plot; this suite
is the pytest-benchmark view of the same grid, for its comparison and history tooling.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastclu import bench


def test_op(benchmark, bench_point, bench_device: torch.device, bench_rounds: int) -> None:
    case_name, dname, size, impl = bench_point
    case = bench.CASES[case_name]
    dtype = bench.DTYPES[dname]
    shapes = bench.size_shapes(size)
    nbytes = bench.case_bytes(case_name, shapes, dtype)
    if impl == "copy":
        fn = bench.copy_step(nbytes, bench_device)
    elif impl in bench.BACKENDS:
        fn = case.fastclu(case.make(shapes, dtype, bench_device), impl)
    else:
        fn = case.peers[impl](case.make(shapes, dtype, bench_device))

    def call() -> None:
        fn()
        bench._sync(bench_device)

    # Untimed calls first: compilation (torch.compile, Triton autotuning) and lazy state creation.
    for _ in range(3 if bench_device.type == "cuda" else 1):
        call()
    benchmark.pedantic(call, rounds=bench_rounds, iterations=1, warmup_rounds=2 if bench_device.type == "cuda" else 0)
    benchmark.extra_info.update(
        case=case_name, op=case.op, impl=impl, dtype=dname, size=size, bytes=nbytes,
        numel=sum(math.prod(s) for s in shapes), peak_extra_bytes=bench._peak_extra(fn, bench_device),
    )  # fmt: skip
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["gbps"] = nbytes / stats.stats.median / bench.GB


@pytest.mark.parametrize("model", sorted(bench.MODEL_SHAPES))
def test_model_shape_lists_are_nonempty(model: str) -> None:
    # Guards the grid: a model list that silently lost its tensors would benchmark nothing.
    shapes = bench.MODEL_SHAPES[model]()
    assert len(shapes) > 10 and all(all(d > 0 for d in s) for s in shapes)
