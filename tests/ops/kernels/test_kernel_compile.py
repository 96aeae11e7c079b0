"""Every Triton kernel compiles for a CUDA target (sm_90) on a machine without a GPU.

Under the interpreter nothing is compiled, so a kernel that only works there (an unsupported
op, a bad cast) would pass the CPU suite and fail on the first GPU. Triton's bundled ptxas
assembles the PTX here; whole blocks must come out with vectorised (v2/v4) global accesses.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[2]


def _compile(full: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, str(HERE / "_compile_kernels.py")] + (["all"] if full else [])
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(records: list[dict]) -> None:
    assert records, "no kernel was compiled"
    bad = [r for r in records if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['variant']}: {r['error']}" for r in bad)
    scalar_only = [r["kernel"] for r in records if r["variant"].get("EVEN") and r["vector_accesses"] == 0]
    assert not scalar_only, f"whole-block variants without vectorised accesses: {scalar_only}"


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton")
    _check(_compile(full=False))


@pytest.mark.slow
def test_kernels_compile_for_sm90_all_variants() -> None:
    pytest.importorskip("triton")
    _check(_compile(full=True))
