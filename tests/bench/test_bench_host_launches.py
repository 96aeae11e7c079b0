"""Kernel launches per step of every ``fastclu bench --host`` case, counted by the launch stubs.

The counts are the design's (one fused launch per bucket, plus AdamW's step-counter kernel on
triton, the gram pass of a clipped step, perturb + restore): a change that adds a launch to a
step must change these numbers on purpose.
"""

from __future__ import annotations

import pytest
import torch
from _cpu_module import build_cpu_module

from fastclu.bench import host

# tiny200: 200 one-element fp32 tensors, one bucket
EXPECTED = {
    "triton": {"adamw": 2, "masked_clipped_2role": 4, "amp": 4, "fastslow": 2, "perturb_restore": 3},
    # the cuda backend's CPU execution mode, calls into the extension: one combine_step call advances
    # AdamW's counters, forms a clip factor and steps (up to 3 kernels)
    "cuda": {"adamw": 1, "masked_clipped_2role": 2, "amp": 2, "fastslow": 1, "perturb_restore": 3},
}


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_launches_per_step_of_every_host_case(backend: str) -> None:
    if backend == "cuda":
        build_cpu_module()  # the CPU execution mode's module; built here if no earlier test has
    use, skipped = host.usable_host_backends(torch.device("cpu"))
    if backend not in use:
        pytest.skip(skipped[backend])
    counts = {}
    for case in host.HOST_CASES:
        row = host.measure_fastclu(case, backend, "tiny200", torch.device("cpu"), warmup=0, repeats=1)
        assert row["error"] is None, row["error"]
        counts[case] = row["launches"]
    assert counts == EXPECTED[backend]


def test_every_case_has_a_launch_count_in_the_rows(tmp_path) -> None:
    from fastclu import bench

    path = tmp_path / "host.json"
    argv = ["--host", "--host-shapes", "tiny200", "--warmup", "0", "--repeats", "1", "--device", "cpu",
            "--json", str(path)]  # fmt: skip
    assert bench.main(argv) == 0
    import json

    rows = json.loads(path.read_text())["rows"]
    fastclu_rows = [r for r in rows if r["impl"].startswith("fastclu")]
    assert {r["case"] for r in fastclu_rows} == set(host.HOST_CASES)
    assert all(r["error"] is None and r["launches"] is not None and r["launches"] > 0 for r in fastclu_rows)
    assert {r["impl"] for r in fastclu_rows} >= {"fastclu[triton]"}
