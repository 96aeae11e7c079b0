"""Every Triton kernel compiles for a CUDA target (sm_90) on a machine without a GPU.

Under the interpreter nothing is compiled, so a kernel that only works there (an unsupported
op, a bad cast) would pass the CPU suite and fail on the first GPU. Triton's bundled ptxas
assembles the PTX here; whole blocks must come out with vectorised (v2/v4) global accesses,
one mask byte load per 8 elements and (combine) no scalar stores.
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
    # packed masks: one byte load per 8 elements (BLOCK 1024 over 128 threads: 8 elements, 1 byte
    # per thread), not one per element; combine's stores (update mode included) stay vectorised
    whole = [r for r in records if r["variant"].get("EVEN")]
    masked = [r for r in whole if r["kernel"] in ("_combine_kernel", "_gram_kernel") and r["variant"].get("HAS_MASK")]
    assert masked, "no masked combine/gram variant was compiled"
    many = [(r["kernel"], r["byte_loads"]) for r in masked if r["byte_loads"] > 1]
    assert not many, f"mask bytes loaded more than once per 8 elements: {many}"
    scalar_st = [(r["variant"].get("RULE"), r["scalar_stores"]) for r in masked if r["kernel"] == "_combine_kernel"]
    assert all(n == 0 for _, n in scalar_st), f"combine with scalar (predicated) stores: {scalar_st}"


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton")
    _check(_compile(full=False))


@pytest.mark.slow
def test_kernels_compile_for_sm90_all_variants() -> None:
    pytest.importorskip("triton")
    _check(_compile(full=True))
