"""The cuda backend's CPU mode itself: the paths the shared suite cannot reach with CPU tensors
(found_inf read by the kernel, host step counters), the shim's fp16/bf16 rounding, the switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cpu_module import build_cpu_module
from _kernel_cases import CUDA_ON_CPU, SIZES, assert_close, assert_equal, clone
from test_kernel_combine import CASES, _inputs

from fastclu.ops import combine_step_, merge_

pytestmark = pytest.mark.skipif(not CUDA_ON_CPU, reason="the CPU mode runs where there is no GPU")
CUDA = [pytest.param("cuda", marks=pytest.mark.cuda_cpu, id="cuda")]
ROOT = Path(__file__).resolve().parents[3]
NON_EMPTY = [s for s in SIZES if s]  # every tensor gets a table row


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize(
    "case", ["sgd-init-damp-restore-amp", "adamw-tensor-scalars-amp-max", "adamw-plain", "classp-unscaled-amp"]
)
@pytest.mark.parametrize("sizes", [SIZES, NON_EMPTY], ids=["with-empty", "non-empty"])
def test_found_inf_read_by_the_kernel(backend: str, found: float, case: str, sizes: list[int], monkeypatch) -> None:
    """On a GPU a device found_inf reaches the kernel as an address (the in-kernel AMP skip, which
    still performs a fused restore); here the wrapper reads a CPU one on the host, so the call is
    re-issued with the address, and compared with the reference given the same found_inf. Without
    an empty tensor the call's own launch advances the step counters (step mode 3) and reads the
    address too, so they are compared as well."""
    from fastclu.ops.cuda import combine

    rule, R, opts = next((c[1], c[2], c[3]) for c in CASES if c[0] == case)
    params, grads, state, opts = _inputs(rule, R, opts, sizes, torch.float32)
    opts.pop("found_inf", None)
    opts.setdefault("grad_scale", torch.tensor(1.0))
    found_inf = torch.tensor(found)
    cpu, seen = combine._C, []

    class WithFoundInfAddress:
        def __getattr__(self, name: str):
            return getattr(cpu, name)

        def combine_step(self, table, dyn, n_rows, n_chunks, config, stream):
            seen.append(config["found_inf_ptr"])
            cpu.combine_step(table, dyn, n_rows, n_chunks, {**config, "found_inf_ptr": found_inf.data_ptr()}, stream)

    monkeypatch.setattr(combine, "_C", WithFoundInfAddress())
    p_got, s_got = clone(params), {k: clone(v) for k, v in state.items()}
    p_want, s_want = clone(params), {k: clone(v) for k, v in state.items()}
    # the kernel alone decides the skip; the step counters still follow found_inf (by 0 or 1)
    combine_step_(p_got, grads, s_got, rule=rule, backend=backend, **opts)
    combine_step_(p_want, grads, s_want, rule=rule, backend="reference", found_inf=found_inf, **opts)
    assert seen == [0], "the wrapper passed an address itself: this test no longer re-issues anything"
    assert_close(p_got, p_want, torch.float32)
    for k in state:
        # with an empty tensor torch advanced the counters before the call, blind to the address
        if k != "step" or sizes is NON_EMPTY:
            assert_close(s_got[k], s_want[k], torch.float32, scale=4.0)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("rule", ["adamw", "classp"])
@pytest.mark.parametrize("sizes", [SIZES, NON_EMPTY], ids=["with-empty", "non-empty"])
def test_device_step_counters_advance_by_one(backend: str, rule: str, sizes: list[int], monkeypatch) -> None:
    """Device counters move by one on every tensor: in the call's own launch (step mode 3) when every
    tensor has a table row, by torch before the call (mode 2) when an empty tensor has none."""
    from fastclu.ops.cuda import combine

    cpu, modes = combine._C, []

    class RecordStepMode:
        def __getattr__(self, name: str):
            return getattr(cpu, name)

        def combine_step(self, table, dyn, n_rows, n_chunks, config, stream):
            modes.append(config["step_mode"])
            cpu.combine_step(table, dyn, n_rows, n_chunks, config, stream)

    monkeypatch.setattr(combine, "_C", RecordStepMode())
    opts = {"lr": 1e-2, "weight_decay": 0.1} if rule == "adamw" else {"lr": 0.1, "threshold": 0.0}
    params, grads, state, opts = _inputs(rule, 2, opts, sizes, torch.float32)
    before = [float(s) for s in state["step"]]
    p_got, p_want = clone(params), clone(params)
    s_got, s_want = {k: clone(v) for k, v in state.items()}, {k: clone(v) for k, v in state.items()}
    combine_step_(p_got, grads, s_got, rule=rule, backend=backend, **opts)
    combine_step_(p_want, grads, s_want, rule=rule, backend="reference", **opts)
    assert modes == [2 if 0 in sizes else 3]
    assert [float(s) for s in s_got["step"]] == [b + 1 for b in before]
    assert_close(p_got, p_want, torch.float32)
    for k in state:
        assert_close(s_got[k], s_want[k], torch.float32, scale=4.0)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("same_step", [True, False])
def test_host_step_counters(backend: str, same_step: bool, monkeypatch) -> None:
    """AdamW step modes 0 (one host value) and 1 (per-tensor values uploaded as an array)."""
    from fastclu.ops import _cuda_cpu_mode

    monkeypatch.setattr(_cuda_cpu_mode, "HOST_STEP_COUNTERS", True)
    params, grads, state, opts = _inputs("adamw", 2, CASES[7][3], SIZES, torch.float32)
    if same_step:
        state["step"] = [torch.tensor(5.0) for _ in SIZES]
    p_got, p_want = clone(params), clone(params)
    s_got, s_want = {k: clone(v) for k, v in state.items()}, {k: clone(v) for k, v in state.items()}
    combine_step_(p_got, grads, s_got, rule="adamw", backend=backend, **opts)
    combine_step_(p_want, grads, s_want, rule="adamw", backend="reference", **opts)
    assert_close(p_got, p_want, torch.float32)
    for k in state:
        assert_close(s_got[k], s_want[k], torch.float32, scale=4.0)


def _every_finite(dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shim_rounding_is_bit_exact(backend: str, dtype: torch.dtype) -> None:
    """merge_ with alpha 0 stores the anchor: every finite fp16/bf16 value widens exactly, and fp32
    values (subnormal, halfway and overflowing ones included) narrow by round-to-nearest-even."""
    every = _every_finite(dtype)
    wide = [torch.zeros(every.numel())]
    merge_(wide, [every], 0.0, backend=backend)
    assert torch.equal(wide[0], every.float())
    info = torch.finfo(dtype)
    x = torch.cat([
        torch.randn(20000) * torch.logspace(-30, 5, 20000),
        every.float() + every.float().abs() * info.eps / 2,  # halfway cases: ties to even
        torch.tensor([info.max * (1 + info.eps / 2), info.max * (1 + info.eps / 4), info.tiny / 3, -info.tiny / 2]),
    ])  # fmt: skip
    x = x[torch.isfinite(x)]
    narrow = [torch.zeros(x.numel(), dtype=dtype)]
    merge_(narrow, [x], 0.0, backend=backend)
    assert_equal(narrow, [x.to(dtype)])


def test_switch_runs_the_backend_on_cpu_tensors() -> None:
    """FASTCLU_CUDA_ON_CPU=1 is the process-wide switch (what scripts use)."""
    build_cpu_module()
    code = (
        "import torch, fastclu; from fastclu import ops\n"
        "assert fastclu.backends()['cuda'] is None, fastclu.backends()\n"
        "a, b = [torch.randn(4097), torch.randn(7)], [torch.randn(4097), torch.randn(7)]\n"
        "x, y = [t.clone() for t in a], [t.clone() for t in a]\n"
        "ops.merge_(x, b, 0.3, backend='cuda'); ops.merge_(y, b, 0.3, backend='reference')\n"
        "assert all(torch.equal(p, q) for p, q in zip(x, y))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "FASTCLU_CUDA_ON_CPU": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.parametrize("backend", CUDA)
def test_topk_ties_at_many_boundaries(backend: str) -> None:
    """Five score levels, so the k-th key is tied with thousands of others, at many k: each call
    puts the boundary between taken and untaken ties in another round of the in-chunk scan."""
    from fastclu.ops import topk_mask

    sizes = [4097, 2 * 8192 + 5, 7]
    scores = [torch.randint(-2, 3, (n,)).float() * 0.5 for n in sizes]
    for k in torch.randint(1, sum(sizes), (12,)).tolist():
        assert_equal(topk_mask(scores, k, backend=backend), topk_mask(scores, k, backend="reference"))
