"""Kernel-suite fixtures: without a GPU, the ``cuda`` cases run the csrc kernels on the CPU.

The CPU module ``fastclu._C_cpu`` is built (incrementally) from csrc/ by csrc/cpu/build.py the
first time a cuda case runs, and the cuda backend is switched to it for that case only, so the
rest of the suite sees the backend as it is. FASTCLU_CPU_SEED fixes the block and thread orders
(random per run otherwise; the header of the run prints it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _kernel_cases import CUDA_ON_CPU

ROOT = Path(__file__).resolve().parents[3]
os.environ.setdefault("FASTCLU_CPU_SEED", str(int.from_bytes(os.urandom(4), "little")))
_built: list[str] = []  # "" once built, else the reason it could not be


def pytest_report_header(config: pytest.Config) -> str | None:
    if not CUDA_ON_CPU:
        return None
    return f"cuda cases on the CPU (fastclu._C_cpu), FASTCLU_CPU_SEED={os.environ['FASTCLU_CPU_SEED']}"


def _build_cpu_module() -> None:
    if _built:
        if _built[0]:
            pytest.skip(_built[0])
        return
    if shutil.which(os.environ.get("CXX", "g++")) is None or importlib.util.find_spec("pybind11") is None:
        _built.append("the CPU mode needs g++ and pybind11 to build fastclu._C_cpu")
        pytest.skip(_built[0])
    spec = importlib.util.spec_from_file_location("fastclu_cpu_build", ROOT / "csrc" / "cpu" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.build()  # a compile error fails the test that asked for the module
    _built.append("")


@pytest.fixture(autouse=True)
def _cuda_on_cpu(request: pytest.FixtureRequest) -> Iterator[None]:
    callspec = getattr(request.node, "callspec", None)
    if not CUDA_ON_CPU or callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    _build_cpu_module()
    from fastclu.ops import _cuda_cpu_mode

    undo = _cuda_cpu_mode.enable()
    try:
        yield
    finally:
        undo()
