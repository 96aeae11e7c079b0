"""Build ``fastclu._C_cpu`` (the csrc kernels compiled by g++ for the CPU execution mode) on demand.

One home for every test that needs the module, whatever directory it sits in (tests/ is on
sys.path through its conftest): the first caller builds it (incrementally, csrc/cpu/build.py),
later callers reuse the result or the reason it could not be built.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_built: list[str] = []  # "" once built, else the reason it could not be


def cpu_module_unbuildable() -> str | None:
    """Build fastclu._C_cpu once per session; the reason it cannot be built here, or None once built.

    A compile error raises (it fails the test that asked for the module); a missing compiler or
    source checkout is a reason, not an error.
    """
    if not _built:
        script = _ROOT / "csrc" / "cpu" / "build.py"
        if not script.is_file():
            _built.append(f"no {script} (the CPU mode builds fastclu._C_cpu from a source checkout)")
        elif shutil.which(os.environ.get("CXX", "g++")) is None or importlib.util.find_spec("pybind11") is None:
            _built.append("the CPU mode needs g++ and pybind11 to build fastclu._C_cpu")
        else:
            spec = importlib.util.spec_from_file_location("fastclu_cpu_build", script)
            assert spec is not None and spec.loader is not None
            build = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(build)
            build.build()
            importlib.invalidate_caches()  # the import system may have cached the module's absence
            _built.append("")
    return _built[0] or None


def build_cpu_module() -> None:
    """Build fastclu._C_cpu once per session, or skip the calling test saying why it cannot be built."""
    reason = cpu_module_unbuildable()
    if reason is not None:
        pytest.skip(reason)
