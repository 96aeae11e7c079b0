"""Kernel-suite fixtures: without a GPU, the ``cuda`` cases run the csrc kernels on the CPU.

The CPU module ``fastclu._C_cpu`` is built (incrementally) from csrc/ by csrc/cpu/build.py the
first time a cuda case runs, and the cuda backend is switched to it for that case only, so the
rest of the suite sees the backend as it is. FASTCLU_CPU_SEED fixes the block and thread orders
(random per run otherwise; the header of the run prints it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _kernel_cases import CUDA_ON_CPU, build_cpu_module

os.environ.setdefault("FASTCLU_CPU_SEED", str(int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config: pytest.Config) -> str | None:
    if not CUDA_ON_CPU:
        return None
    return f"cuda cases on the CPU (fastclu._C_cpu), FASTCLU_CPU_SEED={os.environ['FASTCLU_CPU_SEED']}"


@pytest.fixture(autouse=True)
def _cuda_on_cpu(request: pytest.FixtureRequest) -> Iterator[None]:
    callspec = getattr(request.node, "callspec", None)
    if not CUDA_ON_CPU or callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    build_cpu_module()
    from fastclu.ops import _cuda_cpu_mode

    undo = _cuda_cpu_mode.enable()
    try:
        yield
    finally:
        undo()
